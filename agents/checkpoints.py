"""What PPO and CQL checkpoints record and how a checkpoint is matched to the env it is loaded for."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from envs.config import ENV_VERSION, FeedConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained on another env version or config than the one requested."""


def check_version(meta: dict[str, Any], where: Path) -> None:
    """Raises :class:`CheckpointMismatchError` if the checkpoint is from another env version."""
    if meta.get("env_version") != ENV_VERSION:
        raise CheckpointMismatchError(f"checkpoint {where} was trained on env version {meta.get('env_version')!r}, "
                                      f"this code is {ENV_VERSION!r}")


def check_meta(meta: dict[str, Any], cfg: FeedConfig, where: Path, params: dict[str, Any] | None = None) -> None:
    """Raises :class:`CheckpointMismatchError` naming the env version, the differing config fields, or (when
    ``params`` is given, i.e. training is to continue) the differing hyperparameters."""
    check_version(meta, where)
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


def _training_config(meta: dict[str, Any], where: Path) -> FeedConfig:
    """The config a checkpoint was trained on (fields added since take their defaults), checked for the env
    version."""
    if "config" not in meta:
        raise CheckpointMismatchError(f"checkpoint {where} records no env config")
    try:
        cfg = FeedConfig.from_json(meta["config"])
    except (TypeError, ValueError) as err:
        raise CheckpointMismatchError(f"checkpoint {where}: {err}") from err
    check_version(meta, where)
    return cfg


def load_agent(path: Path, name: str | None = None) -> Any:
    """A trained agent as a :class:`agents.policies.Policy`, from a PPO or CQL checkpoint directory
    (discrete ones answer knob vectors through their preset) or a CEM result file (``cem.json``).

    The checkpoint must come from this env version and a config this code can rebuild (else
    :class:`CheckpointMismatchError`); it can then be evaluated on any world, e.g. ``<preset>-shift``."""
    import json

    from agents.policies import ConstantKnobs, PresetKnobs

    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        meta = json.loads(path.read_text())
        _training_config(meta, path)
        return ConstantKnobs(meta["action"], name or "cem_tuned")
    from agents import cql, ppo

    if (path / ppo.META).exists():
        meta = json.loads((path / ppo.META).read_text())
        _training_config(meta, path)
        label = name or ("ppo_discrete" if meta.get("discrete") else "ppo")
        pol: Any = ppo.SB3Policy(ppo.PPO.load(path / ppo.CHECKPOINT, device="cpu"), name=label,
                                 anchor=meta.get("params", {}).get("anchor"))
        return PresetKnobs(pol, label) if meta.get("discrete") else pol
    if (path / cql.META).exists():
        import d3rlpy

        meta = json.loads((path / cql.META).read_text())
        _training_config(meta, path)
        algo = d3rlpy.load_learnable(str(path / cql.CHECKPOINT), device="cpu:0")
        label = name or ("cql_discrete" if meta["discrete"] else "cql")
        return cql.D3RLPolicy(algo, bool(meta["discrete"]), name=label)
    raise FileNotFoundError(f"{path} holds no agent: expected a PPO checkpoint ({ppo.META}), a CQL checkpoint "
                            f"({cql.META}) or a cem.json file")
