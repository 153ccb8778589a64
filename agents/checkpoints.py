"""What PPO and CQL checkpoints record and how a checkpoint is matched to the env it is loaded for.

A checkpoint is a model file and its metadata (JSON), written as two atomic writes, the model first. The
metadata records the model file's sha256 (:data:`MODEL_SHA256`), so a model that does not match it (a run
killed between the two writes, or a damaged file) is refused with :class:`CorruptCheckpointError` instead
of being loaded with other weights or resumed with another step count; so is a metadata file that records
no hash."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from envs.config import ENV_VERSION, FeedConfig
from rankers.fileio import file_sha256, stale_path

MODEL_SHA256 = "model_sha256"
"""Metadata key of the model file's sha256 (hex)."""
RESTART_HINT = "delete the checkpoint directory, or resume with restart_mismatched=True to set it aside"


class CheckpointMismatchError(ValueError):
    """A checkpoint was trained on another env version or config than the one requested."""


class CorruptCheckpointError(CheckpointMismatchError):
    """A checkpoint's files are damaged, truncated, incomplete or inconsistent with each other. A subclass of
    :class:`CheckpointMismatchError`, so ``restart_mismatched`` sets such a checkpoint aside like a mismatched one."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checkpoint_meta(path: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A checkpoint's metadata file as a dict, with the ``required`` keys and, where present, a dict ``config``
    and ``params``; else :class:`CorruptCheckpointError` naming the file and what is wrong with it."""
    try:
        meta = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, ValueError) as err:
        raise CorruptCheckpointError(f"checkpoint metadata {path} is not valid JSON ({err}): the file is damaged; "
                                     f"{RESTART_HINT}") from err
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"checkpoint metadata {path} holds a JSON {type(meta).__name__}, not an object: "
                                     f"the file is damaged; {RESTART_HINT}")
    missing = [k for k in required if k not in meta]
    if missing:
        raise CorruptCheckpointError(f"checkpoint metadata {path} lacks {', '.join(missing)}: the file is damaged or "
                                     f"not a checkpoint's; {RESTART_HINT}")
    bad = [k for k in ("config", "params") if k in meta and not isinstance(meta[k], dict)]
    if bad:
        raise CorruptCheckpointError(f"checkpoint metadata {path}: {', '.join(bad)} is not a JSON object: the file is "
                                     f"damaged; {RESTART_HINT}")
    return meta


def check_files(model: Path, meta_path: Path, kind: str) -> None:
    """Raises ``FileNotFoundError`` if neither file of a ``kind`` checkpoint exists, and
    :class:`CorruptCheckpointError` if only one does (a run killed before it wrote both)."""
    have = [p.exists() for p in (model, meta_path)]
    if not any(have):
        raise FileNotFoundError(f"no {kind} checkpoint in {model.parent} (expected {model.name} and {meta_path.name})")
    if not all(have):
        there, gone = (model, meta_path) if have[0] else (meta_path, model)
        raise CorruptCheckpointError(f"{kind} checkpoint {model.parent} is incomplete: {there.name} without "
                                     f"{gone.name} (a run killed between the two writes?); {RESTART_HINT}")


def verify_model(meta: dict[str, Any], model: Path, meta_path: Path) -> None:
    """Raises :class:`CorruptCheckpointError` if ``model``'s sha256 is not the one ``meta`` records, or ``meta``
    records none."""
    want = meta.get(MODEL_SHA256)
    if want is None:
        raise CorruptCheckpointError(f"checkpoint metadata {meta_path} records no {MODEL_SHA256} of {model.name}: the "
                                     f"file is damaged or not a checkpoint's; {RESTART_HINT}")
    got = file_sha256(model)
    if got != want:
        raise CorruptCheckpointError(f"checkpoint {model} does not match its metadata {meta_path.name} (sha256 "
                                     f"{got[:12]}..., recorded {str(want)[:12]}...): the file is damaged, or the run "
                                     f"was killed between writing it and its metadata; {RESTART_HINT}")


def read_checkpoint(model: Path, meta_path: Path, kind: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The metadata of a ``kind`` checkpoint whose two files are both there (:func:`check_files`), readable
    (:func:`read_checkpoint_meta`, with the ``required`` keys) and consistent (:func:`verify_model`): what every loader
    checks before it compares the metadata with what it was asked for and loads the model."""
    check_files(model, meta_path, kind)
    meta = read_checkpoint_meta(meta_path, required=required)
    verify_model(meta, model, meta_path)
    return meta


def load_model_file(load: Callable[[], Any], model: Path, library: str) -> Any:
    """``load()`` with the library's errors on a damaged file (bad zip, unpickling, truncation, ...) raised as
    :class:`CorruptCheckpointError` naming the file."""
    try:
        return load()
    except CheckpointMismatchError:
        raise
    except Exception as err:  # the libraries raise anything from ValueError to UnpicklingError or EOFError
        raise CorruptCheckpointError(f"checkpoint {model} cannot be loaded by {library} ({type(err).__name__}: "
                                     f"{err}): the file is damaged, truncated or not a {library} checkpoint; "
                                     f"{RESTART_HINT}") from err


def check_discrete(meta: dict[str, Any], discrete: bool, where: Path) -> None:
    """Raises :class:`CheckpointMismatchError` if the checkpoint's action space (knob menu or knobs) is not
    the requested one."""
    if "discrete" in meta and bool(meta["discrete"]) != discrete:
        def kind(d: bool) -> str:
            return "discrete (knob menu)" if d else "continuous (knobs)"
        raise CheckpointMismatchError(f"checkpoint {where} is {kind(bool(meta['discrete']))}; requested "
                                      f"{kind(discrete)}")


def _trained_on(preset: str | None) -> str:
    return f"preset {preset!r}" if preset else "its training env"


def check_observation_dim(name: str, trained_preset: str | None, trained_dim: int | None, got_dim: int,
                          preset: str | None = None) -> None:
    """Raises ``ValueError`` naming both presets and dims if an agent trained on ``trained_dim``-dim
    observations is given ``got_dim``-dim ones (without it torch or SB3 fail deep inside with a shape error)."""
    if trained_dim is not None and got_dim != trained_dim:
        here = f"the simulator of preset {preset!r} gives" if preset else "it is given"
        raise ValueError(f"agent {name!r} was trained on {_trained_on(trained_preset)} with {trained_dim}-dim "
                         f"observations; {here} {got_dim}-dim ones: evaluate it on a preset with the same "
                         "observation layout (corpus.emb_dim) or train one for this preset")


def check_action_dim(name: str, trained_preset: str | None, trained_actions: int | None, discrete: bool,
                     preset: str | None = None) -> None:
    """Raises ``ValueError`` if an agent's action size is not this env's (the knobs, or the knob menu)."""
    from envs.feed_env import MENU_MATRIX
    from rankers.config import N_KNOBS

    want = len(MENU_MATRIX) if discrete else N_KNOBS
    if trained_actions is not None and trained_actions != want:
        what = "presets on the menu" if discrete else "knobs"
        raise ValueError(f"agent {name!r} was trained on {_trained_on(trained_preset)} with {trained_actions} "
                         f"actions; {f'preset {preset!r}' if preset else 'this env'} has {want} {what}: "
                         "train one for this env")


def check_fits(policy: Any, sim: Any) -> str | None:
    """The checks of :func:`check_observation_dim` and :func:`check_action_dim` for a policy adapter
    (``name``, ``trained_on``, ``obs_dim``, ``action_dim``, ``discrete``) bound to ``sim``; returns the
    simulator's preset (for the adapter's later messages)."""
    preset = getattr(getattr(sim, "cfg", None), "preset", None)
    layout = getattr(sim, "layout", None)
    if layout is not None:
        check_observation_dim(policy.name, policy.trained_on, policy.obs_dim, int(layout.dim), preset)
    check_action_dim(policy.name, policy.trained_on, policy.action_dim, policy.discrete, preset)
    return preset


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


def set_aside(out: Path, reason: object, then: str = "training from scratch") -> Path:
    """Moves a checkpoint directory (or a result file) that cannot be resumed or reused to ``<out>.stale-<n>``
    (nothing is deleted) and says why, where it went and ``then`` what happens."""
    dest = stale_path(out)
    shutil.move(str(out), str(dest))
    print(f"      {reason}\n      -> moved to {dest}; {then}")
    return dest


def training_config(meta: dict[str, Any], where: Path) -> FeedConfig:
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
