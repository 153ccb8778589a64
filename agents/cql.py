"""Offline agents: CQL (continuous knobs) and DiscreteCQL (preset menu) with d3rlpy, trained on
logged datasets; their metrics reach the project's sink through d3rlpy's ``LoggerAdapter``
protocol; checkpoints are atomic and an interrupted run resumes from the last epoch."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agents.checkpoints import CheckpointMismatchError, check_meta, set_aside
from agents.sinks import MetricsSink, NoopSink
from envs.config import ENV_VERSION, FeedConfig
from rankers.fileio import atomic_write
from rankers.types import Array

CHECKPOINT = "cql.d3"
META = "cql.json"


def quiet_d3rlpy() -> None:
    """d3rlpy logs INFO/DEBUG to stdout through structlog by default."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@dataclass(frozen=True)
class CQLParams:
    """d3rlpy's own names (``CQLConfig`` / ``DiscreteCQLConfig``), passed through."""

    batch_size: int = 256
    gamma: float = 0.99
    n_action_samples: int = 4  # continuous only (d3rlpy default 10 is 10x slower on CPU)
    conservative_weight: float = 5.0  # continuous only
    alpha: float = 1.0  # discrete only
    target_update_interval: int = 1000  # discrete only


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


def load_cql(out: Path, cfg: FeedConfig, params: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """Loads a CQL checkpoint, refusing one from another env version or config (and, if ``params`` is given,
    trained with other hyperparameters) with :class:`CheckpointMismatchError`."""
    import d3rlpy

    if not (out / META).exists() or not (out / CHECKPOINT).exists():
        raise FileNotFoundError(f"no CQL checkpoint in {out} (expected {CHECKPOINT} and {META})")
    meta = json.loads((out / META).read_text())
    check_meta(meta, cfg, out, params=params)
    return d3rlpy.load_learnable(str(out / CHECKPOINT), device="cpu:0"), meta


def train_cql(dataset: Any, cfg: FeedConfig, n_steps: int, out: Path, seed: int = 0, discrete: bool = False,
              params: CQLParams | None = None, sink: MetricsSink | None = None, resume: bool = True,
              steps_per_epoch: int = 1000, progress: bool = False, restart_mismatched: bool = False,
              dataset_id: Any = None) -> Any:
    """Trains CQL (or DiscreteCQL) on a d3rlpy ``MDPDataset`` for ``n_steps`` gradient steps.

    ``dataset_id`` (JSON-able, e.g. the logged dataset's collection record and counts) is stored with the
    hyperparameters, so resuming on another dataset is a mismatch like other hyperparameters.

    A checkpoint in ``out`` from another env version or config raises :class:`CheckpointMismatchError`,
    or with ``restart_mismatched`` is moved aside (``<out>.stale-<n>``) and training starts afresh."""
    import d3rlpy
    from d3rlpy.algos import CQLConfig, DiscreteCQLConfig

    quiet_d3rlpy()
    params = params or CQLParams()
    pdict = {**asdict(params), "dataset": json.loads(json.dumps(dataset_id))}
    sink = sink or NoopSink()
    out.mkdir(parents=True, exist_ok=True)
    d3rlpy.seed(seed)
    done = 0
    algo = None
    if resume and (out / META).exists():
        try:
            algo, meta = load_cql(out, cfg, params=pdict)
        except CheckpointMismatchError as err:
            if not restart_mismatched:
                raise
            set_aside(out, err)
            out.mkdir(parents=True, exist_ok=True)
    if algo is not None:
        if meta["discrete"] != discrete:
            raise ValueError(f"checkpoint {out} is {'discrete' if meta['discrete'] else 'continuous'}; "
                             f"requested {'discrete' if discrete else 'continuous'}")
        done = int(meta["steps"])
        d3rlpy.seed(seed + done)
    elif discrete:
        algo = DiscreteCQLConfig(batch_size=params.batch_size, gamma=params.gamma, alpha=params.alpha,
                                 target_update_interval=params.target_update_interval).create(device="cpu:0")
    else:
        algo = CQLConfig(batch_size=params.batch_size, gamma=params.gamma, n_action_samples=params.n_action_samples,
                         conservative_weight=params.conservative_weight).create(device="cpu:0")
    remaining = n_steps - done
    if remaining <= 0:
        return algo
    per_epoch = min(steps_per_epoch, remaining)

    def on_epoch(a: Any, epoch: int, step: int) -> None:
        tmp = out / f".{CHECKPOINT}.tmp"
        a.save(str(tmp))
        tmp.replace(out / CHECKPOINT)
        atomic_write(out / META, json.dumps(_meta(cfg, discrete, pdict, seed, done + step), indent=1).encode())

    algo.fit(dataset, n_steps=remaining, n_steps_per_epoch=per_epoch, experiment_name="cql", with_timestamp=False,
             logger_adapter=SinkAdapterFactory(sink, done), show_progress=progress, save_interval=10**9,
             epoch_callback=on_epoch)
    return algo


class D3RLPolicy:
    """Evaluation adapter for a d3rlpy algorithm (greedy actions; presets mapped to knobs)."""

    env_overrides: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, algo: Any, discrete: bool, name: str = "cql") -> None:
        self.algo = algo
        self.discrete = discrete
        self.name = name

    def bind(self, sim: Any) -> None:
        pass

    def act(self, obs: Array) -> Array:
        a = self.algo.predict(np.asarray(obs, np.float32))
        if self.discrete:
            from envs.feed_env import PRESET_MATRIX

            return PRESET_MATRIX[np.asarray(a, np.int64)]
        return np.clip(np.asarray(a, np.float32), -1, 1)
