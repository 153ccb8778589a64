"""What PPO and CQL checkpoints record and how a checkpoint is matched to the env it is loaded for."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from envs.config import ENV_VERSION, FeedConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained on another env version or config than the one requested."""


def check_meta(meta: dict[str, Any], cfg: FeedConfig, where: Path, params: dict[str, Any] | None = None) -> None:
    """Raises :class:`CheckpointMismatchError` naming the env version, the differing config fields, or (when
    ``params`` is given, i.e. training is to continue) the differing hyperparameters."""
    if meta.get("env_version") != ENV_VERSION:
        raise CheckpointMismatchError(f"checkpoint {where} was trained on env version {meta.get('env_version')!r}, "
                                      f"this code is {ENV_VERSION!r}")
    diff = cfg.differences(meta.get("config", {}))
    if diff:
        raise CheckpointMismatchError(f"checkpoint {where} was trained on preset {meta.get('preset')!r} with another "
                                      f"env config than the requested {cfg.preset!r}: {diff}")
    if params is not None:
        stored = meta.get("params", {})
        bad = sorted(k for k in set(stored) | set(params) if stored.get(k) != params.get(k))
        if bad:
            shown = "; ".join(f"{k}: stored={stored.get(k)!r} here={params.get(k)!r}" for k in bad)
            raise CheckpointMismatchError(f"checkpoint {where} was trained with other hyperparameters: {shown}")


def set_aside(out: Path, reason: Exception) -> Path:
    """Moves a checkpoint directory that cannot be resumed to ``<out>.stale-<n>`` (nothing is deleted)."""
    n = 0
    while (dest := out.with_name(f"{out.name}.stale-{n}")).exists():
        n += 1
    shutil.move(str(out), str(dest))
    print(f"      {reason}\n      -> moved to {dest}; training from scratch")
    return dest
