"""Checkpoint files of the learned models: the meta each records, atomic saving, and loading checked
against what the caller expects (:class:`RankerCheckpointError` names the mismatched field)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from rankers.fileio import atomic_write_with
from rankers.models import (
    FEATURE_SCHEMA_VERSION,
    MODEL_VERSION,
    ModelConfig,
    make_model,
    model_config,
)

CHECKPOINT_FORMAT = "feedgym.learned_model"


class RankerCheckpointError(ValueError):
    """A checkpoint does not fit what the caller expects; the message names the field and both values."""


def checkpoint_meta(model: nn.Module, preset: str, **extra: Any) -> dict[str, Any]:
    """The meta a checkpoint records: kind, model config, feature schema version, preset, item-feature dims."""
    cfg = model_config(model)
    return {"format": CHECKPOINT_FORMAT, "model_version": MODEL_VERSION, "kind": cfg.kind,
            "model_config": cfg.to_dict(),
            "schema_version": FEATURE_SCHEMA_VERSION, "preset": preset,
            "item_feature_dims": {"emb_dim": cfg.emb_dim, "n_topics": cfg.n_topics, "n_formats": cfg.n_formats},
            **extra}


def save_ranker(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Writes ``{"meta", "state_dict"}`` atomically (:func:`rankers.fileio.atomic_write_with`)."""
    return atomic_write_with(path, lambda fh: torch.save({"meta": meta, "state_dict": model.state_dict()}, fh))


def _check(path: Path, name: str, got: Any, want: Any) -> None:
    if got != want:
        raise RankerCheckpointError(f"checkpoint {path}: {name} is {got!r}, expected {want!r}")


def load_ranker(path: str | Path, expected_meta: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Loads a checkpoint; returns (model in eval mode, meta).

    Always checks the format and that the feature schema version is this code's; then every field
    of ``expected_meta`` among ``kind``, ``preset``, ``schema_version`` and ``item_feature_dims``
    (and any other top-level key given).

    Raises:
        RankerCheckpointError: naming the mismatched field and both values.
    """
    path = Path(path)
    blob = torch.load(path, map_location="cpu", weights_only=True)
    meta = blob.get("meta", {}) if isinstance(blob, dict) else {}
    _check(path, "format", meta.get("format"), CHECKPOINT_FORMAT)
    _check(path, "schema_version", meta.get("schema_version"), FEATURE_SCHEMA_VERSION)
    _check(path, "model_version", meta.get("model_version"), MODEL_VERSION)
    for k, want in (expected_meta or {}).items():
        _check(path, k, meta.get(k), want)
    cfg = ModelConfig(**meta["model_config"])
    model = make_model(cfg)
    known = blob["state_dict"].get("known_ids")
    if known is not None:
        model.known_ids = torch.zeros_like(known)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, meta



def save_models(out: str | Path, models: dict[str, nn.Module], preset: str, **extra: Any) -> dict[str, Path]:
    """Writes each model to ``out/<kind>.pt`` (:func:`save_ranker`, meta of :func:`checkpoint_meta`
    with ``extra``); returns the paths."""
    out = Path(out)
    return {kind: save_ranker(out / f"{kind}.pt", m, checkpoint_meta(m, preset, **extra))
            for kind, m in models.items()}


def load_models(paths: dict[str, Path], expected_meta: dict[str, Any] | None = None) -> dict[str, nn.Module]:
    """Loads ``{kind: path}`` checkpoints, each checked for its kind and ``expected_meta``
    (:func:`load_ranker`; raises :class:`RankerCheckpointError` naming the field)."""
    return {kind: load_ranker(p, {"kind": kind, **(expected_meta or {})})[0] for kind, p in paths.items()}

