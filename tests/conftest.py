"""Shared fixtures for the feedgym tests. Everything runs on the ``tiny`` preset."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

os.environ.setdefault("WANDB_MODE", "disabled")

import envs  # noqa: F401  (registers the env ids)
from envs.config import FeedConfig, make_config

# Property tests draw the same examples on every run (a CI result must not depend on the draw).
settings.register_profile("feedgym", derandomize=True)
settings.load_profile("feedgym")


@pytest.fixture(scope="session")
def tiny() -> FeedConfig:
    return make_config("tiny")
