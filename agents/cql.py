"""Offline agents: CQL (continuous knobs) and DiscreteCQL (knob menu) with d3rlpy, trained on
logged datasets; their metrics reach the project's sink through d3rlpy's ``LoggerAdapter``
protocol; checkpoints are atomic and an interrupted run resumes from the last epoch."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agents.checkpoints import (
    MODEL_SHA256,
    RESTART_HINT,
    CheckpointMismatchError,
    CorruptCheckpointError,
    check_discrete,
    check_fits,
    check_meta,
    check_observation_dim,
    load_model_file,
    read_checkpoint,
    set_aside,
    sha256_bytes,
    training_config,
)
from agents.policies import module_digest
from agents.sinks import MetricsSink, NoopSink
from envs.config import ENV_VERSION, FeedConfig
from offline_data.convert import quiet_d3rlpy
from rankers.fileio import atomic_write
from rankers.types import Array

CHECKPOINT = "cql.d3"
META = "cql.json"
META_REQUIRED: tuple[str, ...] = ("discrete", "steps")
"""Keys of :data:`META` that loading and resuming read."""



@dataclass(frozen=True)
class CQLParams:
    """d3rlpy's own names (``CQLConfig`` / ``DiscreteCQLConfig``), passed through."""

    batch_size: int = 256
    gamma: float = 0.99
    n_action_samples: int = 4  # continuous only (d3rlpy default 10 is 10x slower on CPU)
    conservative_weight: float = 5.0  # continuous only
    alpha: float = 1.0  # discrete only
    target_update_interval: int = 1000  # discrete only
    reward_scale: float = 1.0
    """Rewards are multiplied by this in training (d3rlpy ``MultiplyRewardScaler``; 1 = none). The
    ``churn_expected`` reward is ~1e-3 a request, so the conservative penalty, whose size does not depend on
    the rewards, dwarfs them (docs/point7.md, "Why CQL serves its anchor")."""


class SinkAdapter:
    """d3rlpy ``LoggerAdapter`` that forwards metrics as ``losses/<name>``."""

    def __init__(self, sink: MetricsSink, offset: int) -> None:
        self.sink = sink
        self.offset = offset

    def write_params(self, params: dict[str, Any]) -> None:
        pass

    def before_write_metric(self, epoch: int, step: int) -> None:
        pass

    def write_metric(self, epoch: int, step: int, name: str, value: float) -> None:
        self.sink.log({f"losses/{name}": float(value)}, step=self.offset + step)

    def after_write_metric(self, epoch: int, step: int) -> None:
        pass

    def save_model(self, epoch: int, algo: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def watch_model(self, epoch: int, step: int) -> None:
        pass


class SinkAdapterFactory:
    def __init__(self, sink: MetricsSink, offset: int) -> None:
        self.sink = sink
        self.offset = offset

    def create(self, algo: Any, experiment_name: str, n_steps_per_epoch: int) -> SinkAdapter:
        return SinkAdapter(self.sink, self.offset)


def _meta(cfg: FeedConfig, discrete: bool, params: dict[str, Any], seed: int, steps: int) -> dict[str, Any]:
    return {"env_version": ENV_VERSION, "preset": cfg.preset, "config": cfg.to_json(),
            "discrete": discrete, "params": params, "seed": seed, "steps": steps}


def save_cql(algo: Any, out: Path, meta: dict[str, Any]) -> None:
    """Writes the model atomically (d3rlpy saves to a path: to a scratch file, whose bytes are then written
    fsynced and renamed into place), then its metadata with the model's sha256. A run killed between the two
    writes leaves a model that does not match its metadata, which :func:`load_cql` refuses as incomplete
    instead of resuming it one epoch behind."""
    fd, scratch = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", suffix=".partial", dir=out)
    os.close(fd)
    try:
        algo.save(scratch)
        data = Path(scratch).read_bytes()
    finally:
        os.unlink(scratch)
    atomic_write(out / CHECKPOINT, data)
    atomic_write(out / META, json.dumps({**meta, MODEL_SHA256: sha256_bytes(data)}, indent=1).encode())


def load_cql(out: Path, cfg: FeedConfig, params: dict[str, Any] | None = None,
             discrete: bool | None = None) -> tuple[Any, dict[str, Any]]:
    """Loads a CQL checkpoint, refusing one from another env version or config (and, if given, trained with
    other hyperparameters ``params`` or on the other action space ``discrete``) with
    :class:`CheckpointMismatchError`, and one whose files are damaged, incomplete or do not match each other
    with its subclass :class:`~agents.checkpoints.CorruptCheckpointError`. ``FileNotFoundError`` if ``out``
    holds neither file."""
    import d3rlpy

    model_path, meta_path = out / CHECKPOINT, out / META
    meta = read_checkpoint(model_path, meta_path, "CQL", required=META_REQUIRED)
    check_meta(meta, cfg, out, params=params)
    if discrete is not None:
        check_discrete(meta, discrete, out)
    steps = meta["steps"]
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise CorruptCheckpointError(f"checkpoint metadata {meta_path}: steps is {steps!r}, not a step count: the "
                                     f"file is damaged; {RESTART_HINT}")
    algo = load_model_file(lambda: d3rlpy.load_learnable(str(model_path), device="cpu:0"), model_path, "d3rlpy")
    return algo, meta


def train_cql(dataset: Any, cfg: FeedConfig, n_steps: int, out: Path, seed: int = 0, discrete: bool = False,
              params: CQLParams | None = None, sink: MetricsSink | None = None, resume: bool = True,
              steps_per_epoch: int = 1000, progress: bool = False, restart_mismatched: bool = False,
              dataset_id: Any = None) -> Any:
    """Trains CQL (or DiscreteCQL) on a d3rlpy ``MDPDataset`` for ``n_steps`` gradient steps.

    ``dataset_id`` (JSON-able, e.g. the logged dataset's collection record and counts) is stored with the
    hyperparameters, so resuming on another dataset is a mismatch like other hyperparameters.

    A checkpoint in ``out`` from another env version, config or action space, or a damaged or incomplete one
    (:class:`~agents.checkpoints.CorruptCheckpointError`), raises :class:`CheckpointMismatchError`, or with
    ``restart_mismatched`` is moved aside (``<out>.stale-<n>``, nothing is deleted) and training starts afresh."""
    import d3rlpy
    from d3rlpy.algos import CQLConfig, DiscreteCQLConfig

    quiet_d3rlpy()
    params = params or CQLParams()
    if not (np.isfinite(params.reward_scale) and params.reward_scale > 0):  # before any checkpoint is touched
        raise ValueError(f"reward_scale={params.reward_scale} is invalid: must be a finite number > 0")
    pdict = {**asdict(params), "dataset": json.loads(json.dumps(dataset_id))}
    sink = sink or NoopSink()
    out.mkdir(parents=True, exist_ok=True)
    d3rlpy.seed(seed)
    done = 0
    algo = None
    if resume and ((out / META).exists() or (out / CHECKPOINT).exists()):
        try:
            algo, meta = load_cql(out, cfg, params=pdict, discrete=discrete)
        except CheckpointMismatchError as err:
            if not restart_mismatched:
                raise
            set_aside(out, err)
            out.mkdir(parents=True, exist_ok=True)
    scaler: dict[str, Any] = {}
    if params.reward_scale != 1.0:  # absent otherwise: the default model is the one made before the option
        from d3rlpy.preprocessing import MultiplyRewardScaler

        scaler["reward_scaler"] = MultiplyRewardScaler(params.reward_scale)
    if algo is not None:
        done = int(meta["steps"])
        d3rlpy.seed(seed + done)
    elif discrete:
        algo = DiscreteCQLConfig(batch_size=params.batch_size, gamma=params.gamma, alpha=params.alpha,
                                 target_update_interval=params.target_update_interval, **scaler).create(device="cpu:0")
    else:
        algo = CQLConfig(batch_size=params.batch_size, gamma=params.gamma, n_action_samples=params.n_action_samples,
                         conservative_weight=params.conservative_weight, **scaler).create(device="cpu:0")
    remaining = n_steps - done
    if remaining <= 0:
        return algo
    per_epoch = min(steps_per_epoch, remaining)

    def on_epoch(a: Any, epoch: int, step: int) -> None:
        save_cql(a, out, _meta(cfg, discrete, pdict, seed, done + step))

    algo.fit(dataset, n_steps=remaining, n_steps_per_epoch=per_epoch, experiment_name="cql", with_timestamp=False,
             logger_adapter=SinkAdapterFactory(sink, done), show_progress=progress, save_interval=10**9,
             epoch_callback=on_epoch)
    return algo


def critic_landscape(algo: Any, observations: Array, action: Array, step: float = 0.3) -> dict[str, Any]:
    """What a continuous CQL critic says about moving one knob: over ``observations`` (N, D), the mean of
    Q(s, action -/+ ``step`` on knob k) - Q(s, action) for every knob k (``down`` and ``up``, each (A,); the knob
    clipped to [-1, 1]), beside ``q`` = the mean of Q(s, action) and ``q_sd``, its spread over the states.

    A critic that has learned what the knobs do gives signed, unequal ``down`` / ``up``; one that has only
    learned where the logged actions lie (CQL's penalty lifts Q on them) gives a bump, both negative and alike
    for every knob. Values are in the training reward's units (times ``reward_scale``)."""
    obs = np.asarray(observations, np.float32)
    a0 = np.repeat(np.asarray(action, np.float32).reshape(1, -1), len(obs), axis=0)
    q0 = np.asarray(algo.predict_value(obs, a0), np.float64)
    moved = {}
    for sign, name in ((-1.0, "down"), (1.0, "up")):
        out = np.empty(a0.shape[1])
        for k in range(a0.shape[1]):
            a = a0.copy()
            a[:, k] = np.clip(a[:, k] + sign * step, -1, 1)
            out[k] = float(np.mean(np.asarray(algo.predict_value(obs, a), np.float64) - q0))
        moved[name] = out
    return {"q": float(q0.mean()), "q_sd": float(q0.std()), "step": step, **moved}


class D3RLPolicy:
    """Evaluation adapter for a d3rlpy algorithm (greedy actions; presets mapped to knobs).

    ``bind`` and ``act`` refuse a simulator or observations of another size than the algorithm was trained
    on (``trained_on``: its preset, for the message) with a ``ValueError`` naming both, instead of torch's
    shape error."""

    env_overrides: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, algo: Any, discrete: bool, name: str = "cql", trained_on: str | None = None) -> None:
        self.algo = algo
        self.discrete = discrete
        self.name = name
        self.trained_on = trained_on
        shape = getattr(algo, "observation_shape", None)
        self.obs_dim = int(shape[-1]) if shape else None
        size = getattr(algo, "action_size", None)
        self.action_dim = None if size is None else int(size)
        self._preset: str | None = None

    def bind(self, sim: Any) -> None:
        self._preset = check_fits(self, sim)

    def fingerprint(self) -> dict[str, Any]:
        """The algorithm, its networks' parameters (every module of d3rlpy's ``impl.modules``) and the action
        decoding."""
        mods = self.algo.impl.modules
        nets = [getattr(mods, f.name) for f in dataclasses.fields(mods)]
        return {"class": "D3RLPolicy", "name": self.name, "algo": type(self.algo).__name__, "discrete": self.discrete,
                "params": module_digest(*(m for m in nets if isinstance(m, torch.nn.Module)))}

    def act(self, obs: Array) -> Array:
        check_observation_dim(self.name, self.trained_on, self.obs_dim, int(np.shape(obs)[-1]), self._preset)
        a = self.algo.predict(np.asarray(obs, np.float32))
        if self.discrete:
            from envs.feed_env import MENU_MATRIX

            return MENU_MATRIX[np.asarray(a, np.int64)]
        return np.clip(np.asarray(a, np.float32), -1, 1)


def load_cql_policy(path: Path, name: str | None = None) -> D3RLPolicy:
    """The trained CQL agent of the checkpoint directory ``path`` as a policy, checked as
    :func:`agents.loading.load_agent` says."""
    import d3rlpy

    model_path, meta_path = path / CHECKPOINT, path / META
    meta = read_checkpoint(model_path, meta_path, "CQL", required=META_REQUIRED)
    training_config(meta, path)
    algo = load_model_file(lambda: d3rlpy.load_learnable(str(model_path), device="cpu:0"), model_path, "d3rlpy")
    label = name or ("cql_discrete" if meta["discrete"] else "cql")
    return D3RLPolicy(algo, bool(meta["discrete"]), name=label, trained_on=meta.get("preset"))
