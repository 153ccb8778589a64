"""Evaluation with common random numbers: every policy meets the same users and the same noise.

For each seed, each policy runs a fresh :class:`FeedSimulator` built from that seed (same world, same users, same
per-step random draws) for one episode per user (:mod:`agents.rollouts`); the per-user metrics are then compared
with intervals (:mod:`agents.stats`). The rollouts are independent jobs: they run on an executor
(:mod:`offline_data.executor`: in this process by default, or on Ray), and since each depends only on its job the
results are the same whatever runs them. With a rollout store (:mod:`agents.rollout_store`) the driver reads the
rollouts already finished instead of running them again, and stores each new one as soon as it arrives.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from agents.policies import Policy
from agents.rollout_store import RolloutStore
from agents.rollouts import RolloutJob, RunResult, check_finished, models_for, run_rollout
from agents.stats import Comparison
from envs.config import FeedConfig
from offline_data.executor import Executor, LocalExecutor


class PendingRollouts:
    """Rollouts handed to an executor (the main job evaluates its baselines this way while its agents train).

    A job whose ``store`` holds its result is read at once and not sent; the others run on ``executor``, and the
    driver writes each result to its store as it arrives (workers never write), so a rollout that finished is never
    run again, even when a later one fails or the job is stopped. :meth:`results` waits and returns every result in
    job order; :meth:`cancel` stops those still running."""

    def __init__(self, jobs: Sequence[RolloutJob], executor: Executor) -> None:
        self.jobs = list(jobs)
        for j in self.jobs:
            check_finished("evaluate", j.finished)
        self._out: dict[int, RunResult] = {}
        targets: dict[int, tuple[RolloutStore, Path | None]] = {}
        self._todo: list[int] = []
        for i, job in enumerate(self.jobs):
            if job.store is not None:
                store = RolloutStore(job.store)
                path = store.path(job)  # the key hashes the policy's parameters: once
                if (hit := store.load(path)) is not None:
                    self._out[i] = hit
                    continue
                targets[i] = (store, path)
            self._todo.append(i)

        def arrived(k: int, result: RunResult) -> None:
            i = self._todo[k]
            self._out[i] = result
            if i in targets:
                store, path = targets[i]
                store.save(path, self.jobs[i], result)

        todo = [self.jobs[i] for i in self._todo]
        self._batch = executor.start(run_rollout, todo, common=models_for(j.served for j in todo), on_result=arrived)

    @property
    def n_stored(self) -> int:
        """Jobs read from their store instead of run."""
        return len(self.jobs) - len(self._todo)

    def results(self, bar: Any = None) -> list[RunResult]:
        if bar is not None and self.n_stored:
            bar.update(self.n_stored)
        try:
            self._batch.results(bar)
        finally:
            self._batch.cancel()
        return [self._out[i] for i in range(len(self.jobs))]

    def cancel(self) -> None:
        self._batch.cancel()


def run_jobs(jobs: Sequence[RolloutJob], executor: Executor | None = None, progress: bool = True,
             desc: str = "evaluate", background: Sequence[PendingRollouts] = ()) -> list[RunResult]:
    """Runs ``jobs`` on ``executor`` (default: in this process) and waits for the ``background`` rollouts already
    under way; returns the results of ``jobs`` then of each background set, each in job order. An error or an
    interrupt stops every rollout still running."""
    executor = executor or LocalExecutor()
    pending = [PendingRollouts(jobs, executor)]
    try:
        with tqdm(total=len(jobs) + sum(len(b.jobs) for b in background), desc=desc, disable=not progress) as bar:
            out: list[RunResult] = []
            for p in [*pending, *background]:
                out += p.results(bar)
    finally:
        for p in [*pending, *background]:
            p.cancel()
    return out


def check_seeds(seeds: Sequence[int], who: str = "--seeds") -> None:
    """Evaluation seeds must be non-empty, distinct, non-negative integers: each is one world, and a repeated
    one would count one world twice in the world-level intervals the verdicts use (too narrow)."""
    seeds = list(seeds)
    if not seeds:
        raise ValueError(f"{who} is empty: give at least one evaluation seed (each is one world)")
    if bad := [s for s in seeds if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0]:
        raise ValueError(f"{who} {bad} is invalid: seeds are integers >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{who} {' '.join(map(str, seeds))} is invalid: it repeats a seed (one world counted twice)")


def check_reps(reps: int, who: str = "--bootstrap-reps") -> None:
    """Bootstrap resamples: an integer >= 1 (checked before the rollouts, not after them)."""
    if isinstance(reps, bool) or not isinstance(reps, (int, np.integer)) or reps < 1:
        raise ValueError(f"{who}={reps!r} is invalid: must be an integer >= 1")


def check_policies(policies: Sequence[Policy], who: str = "evaluate") -> None:
    """At least one policy, no two with the same name (results are keyed by name)."""
    names = [p.name for p in policies]
    if not names:
        raise ValueError(f"{who}: no policies to evaluate (give baselines with --policies or agents with --agents)")
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"{who}: policies {dup} are given twice (results are keyed by name)")


def evaluate(policies: Sequence[Policy], cfg: FeedConfig, n_users: int, seeds: Sequence[int],
             progress: bool = True, executor: Executor | None = None, finished: str = "replace",
             store: str | Path | None = None) -> Comparison:
    """Runs every policy on every seed (common random numbers) and returns all runs (seed-major, in policy order).

    Args:
        executor: where the rollouts run (default: in this process); the policies are pickled to its workers.
            Every rollout depends only on its (policy, world, users, seed), so the result is the same on any
            executor and any number of workers.
        finished: what takes the place of a user whose episode ended (:func:`agents.rollouts.rollout`).
        store: a :class:`RolloutStore` directory: rollouts found there are read, new ones written as they end.
    """
    check_finished("evaluate", finished)
    check_seeds(seeds, "evaluate: seeds")
    check_policies(policies)
    where = None if store is None else Path(store)
    jobs = [RolloutJob(p, cfg, n_users, seed, finished, where) for seed in seeds for p in policies]
    return Comparison(runs=run_jobs(jobs, executor, progress))


__all__ = ["PendingRollouts", "check_policies", "check_reps", "check_seeds", "evaluate", "run_jobs"]
