"""Shared fixtures for the feedgym tests. Everything runs on the ``tiny`` preset."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")

import envs  # noqa: F401  (registers the env ids)
from envs.config import FeedConfig, make_config


@pytest.fixture(scope="session")
def tiny() -> FeedConfig:
    return make_config("tiny")
