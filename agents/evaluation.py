"""Evaluation with common random numbers: every policy meets the same users and the same noise.

For each seed, each policy runs a fresh :class:`FeedSimulator` built from that seed (same world,
same users, same per-step random draws) for one episode per user. Per-user episode metrics are
then compared with 95 % bootstrap intervals (``scipy.stats.bootstrap``), and each policy's
*paired* per-user difference from the weighted-sum baseline gets its own interval, plus, where it
fits, the interquartile mean (IQM) of that difference with a 95 % stratified bootstrap interval
(rliable's estimator: users resampled within each seed).

Each rollout also records which knobs a policy turns in which observable user state
(:data:`STATE_GROUPS`: cold-start flag, tenure, time into the session, episode day), decoded from
the observation by its named slices.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from agents.checkpoints import set_aside
from agents.policies import Policy, policy_fingerprint
from envs.config import FeedConfig
from envs.metrics import DEFINITIONS, EpisodeMetrics
from envs.observation import ObservationLayout
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.fileio import atomic_write_with
from rankers.types import Array

#: Episode metrics per user: name -> (definition, higher is better?), defined once in envs/metrics.py.
METRICS: dict[str, tuple[str, bool | None]] = DEFINITIONS
#: Metrics over the whole population of a run (one value per seed).
POPULATION_METRICS: dict[str, tuple[str, bool | None]] = {
    "creators/exposure_gini": ("Gini of impressions over creators", False),
    "perf/request_ms_p50": ("median batched step time per user (ms; wall time, so it depends on what else the "
                            "machine runs: the main job evaluates its baselines beside training)", False),
    "perf/request_ms_p99": ("99th percentile batched step time per user (ms; wall time, as above)", False),
    "perf/rollout_requests": ("batched requests the rollout took: it ends when the last measured user's episode "
                              "does, so a policy that keeps users longer makes longer, costlier rollouts", None),
}
#: Per-user metrics that take only the values 0 and 1. The paired difference of such a metric is
#: -1, 0 or +1 per user and mostly 0, so its interquartile mean is 0 whatever the policies do: no
#: IQM is reported for them (``iqm`` is None), only the mean difference.
BINARY_METRICS: frozenset[str] = frozenset({"retention/retained_30d", "retention/day1_return",
                                            "retention/day7_return"})

#: Observable user-state groups and their bucket labels, in the order of ``RunResult.knob_by_state``
#: rows. Each bucket is decoded from the observation the policy acted on (see :func:`state_buckets`).
STATE_GROUPS: dict[str, tuple[str, ...]] = {
    "user": ("cold_start", "established"),
    "tenure": ("signup<7d", "signup 7-30d", "signup>=30d"),
    "session": ("session<10min", "session 10-30min", "session>=30min"),
    "day": ("day 0", "days 1-6", "day>=7"),
}
_TENURE_EDGES_DAYS = (7.0, 30.0)
_SESSION_EDGES_MIN = (10.0, 30.0)
_DAY_EDGES = (1.0, 7.0)
_EPS = 1e-4  # float32 round trip of the normalised observation (e.g. day 7 / 30 * 30)


@dataclass
class RunResult:
    """One policy on one seed: per-user metrics (B,) and population metrics."""

    policy: str
    seed: int
    per_user: dict[str, Array]
    population: dict[str, float]
    retention_by_day: Array  # (H + 1,) share of users active on each day
    knob_means: Array  # (A,) mean action over active user-requests
    knob_by_state: dict[str, Array] = field(default_factory=dict)
    """Group name in :data:`STATE_GROUPS` -> (G, A) float64 mean action per bucket (NaN where empty)."""
    state_counts: dict[str, Array] = field(default_factory=dict)
    """Group name -> (G,) int64 number of active user-requests that fell in each bucket."""


@dataclass
class Comparison:
    """All runs, grouped by policy; ``summary`` holds intervals."""

    runs: list[RunResult] = field(default_factory=list)
    baseline: str = "weighted_sum"

    def per_user(self, policy: str, metric: str) -> Array:
        """(n_seeds * B,) float64: the policy's per-user values, seeds in increasing order."""
        return np.concatenate(self.per_seed(policy, metric))

    def runs_of(self, policy: str) -> list[RunResult]:
        """The policy's runs, seeds in increasing order."""
        return sorted((r for r in self.runs if r.policy == policy), key=lambda r: r.seed)

    def per_seed(self, policy: str, metric: str) -> list[Array]:
        """One (B,) array per seed, seeds in increasing order (the strata of the IQM bootstrap)."""
        return [np.asarray(r.per_user[metric], np.float64) for r in self.runs_of(policy)]

    def population_per_seed(self, policy: str, metric: str) -> Array:
        """(n_seeds,) float64: the policy's value of a population metric per seed, seeds in increasing order."""
        return np.asarray([r.population[metric] for r in self.runs_of(policy)], np.float64)

    def paired_per_seed(self, policy: str, metric: str, baseline: str | None = None) -> list[Array]:
        """One (B,) array per seed: the policy's per-user paired differences from ``baseline`` (default:
        the comparison's baseline)."""
        base = self.per_seed(baseline or self.baseline, metric)
        return [a - b for a, b in zip(self.per_seed(policy, metric), base)]

    @property
    def policies(self) -> list[str]:
        return list(dict.fromkeys(r.policy for r in self.runs))


def gini(x: Array) -> float:
    """Gini coefficient of a non-negative vector."""
    x = np.sort(np.asarray(x, np.float64))
    if x.sum() <= 0:
        return 0.0
    n = x.size
    return float((2 * np.arange(1, n + 1) - n - 1).dot(x) / (n * x.sum()))


def decode_state(obs: Array, layout: ObservationLayout) -> dict[str, Array]:
    """Natural units of the observed fields the state buckets use, read by name from ``layout``.

    Inverts the normalisation of :meth:`envs.observation.ObservationLayout.build` (a test checks
    the round trip against the simulator's own view). Returns (B,) float64 arrays:
    ``cold_start`` (0/1 flag), ``days_since_signup``, ``session_minutes``, ``episode_day``.
    """
    o = np.asarray(obs, np.float64)

    def col(name: str) -> Array:
        return o[:, layout[name]][:, 0]

    return {
        "cold_start": col("user.cold_start"),
        "days_since_signup": np.expm1(col("user.days_since_signup") * 7.0),
        "session_minutes": col("session.minutes") * 60.0,
        "episode_day": col("episode.day") * layout.horizon,
    }


def state_buckets(obs: Array, layout: ObservationLayout) -> dict[str, Array]:
    """(B, D) observations -> group name -> (B,) int64 bucket index into ``STATE_GROUPS[group]``."""
    v = decode_state(obs, layout)
    return {
        "user": np.where(v["cold_start"] > 0.5, 0, 1).astype(np.int64),
        "tenure": np.searchsorted(np.asarray(_TENURE_EDGES_DAYS) - _EPS, v["days_since_signup"], side="right"),
        "session": np.searchsorted(np.asarray(_SESSION_EDGES_MIN) - _EPS, v["session_minutes"], side="right"),
        "day": np.searchsorted(np.asarray(_DAY_EDGES) - _EPS, v["episode_day"], side="right"),
    }


FINISHED: tuple[str, ...] = ("replace", "retire")
"""What happens to a user whose episode ended (churn or horizon) while others run on (:func:`rollout`)."""


def _check_finished(who: str, finished: str) -> None:
    if finished not in FINISHED:
        raise ValueError(f"{who}: finished={finished!r} is invalid: must be one of {FINISHED}")


def rollout(policy: Policy, cfg: FeedConfig, n_users: int, seed: int, finished: str = "replace") -> RunResult:
    """Runs ``policy`` for one episode per user on a simulator built from ``seed``; the rollout ends when
    the last user's episode does.

    ``finished`` says what takes the place of a user whose episode ended:

    - ``replace`` (default): a new user (``FeedSimulator.reset``), served by the same policy and
      moving the world's counters but not measured. The platform keeps a steady population, as in
      the training environment (autoreset), and the world's traffic keeps its composition.
    - ``retire``: nobody (``FeedSimulator.retire``); the users left stand for the whole population.
      About 3x fewer user-requests on ``small``, but the world's traffic drifts to the heaviest
      survivors, and that changes what policies achieve (README, "Treatment of finished users").
    """
    _check_finished("rollout", finished)
    pcfg = cfg.replace(**policy.env_overrides) if policy.env_overrides else cfg
    sim = FeedSimulator(pcfg, n_users, seed=seed)
    obs = sim.reset()
    policy.bind(sim)
    em = EpisodeMetrics(n_users, pcfg.horizon_days)
    creator_imp = np.zeros(sim.corpus.catalog.n_creators)
    step_ms: list[float] = []
    knob_sum = np.zeros(N_KNOBS)
    state_sum = {g: np.zeros((len(labels), N_KNOBS)) for g, labels in STATE_GROUPS.items()}
    state_n = {g: np.zeros(len(labels), np.int64) for g, labels in STATE_GROUPS.items()}
    n_act = 0
    steps = 0
    while not em.done and steps < pcfg.max_steps:
        active = em.active[sim.uid]  # rows of measured users still in their episode
        action = np.asarray(policy.act(obs), np.float32)
        t0 = sim.latency["total"]
        res = sim.step(action)
        step_ms.append((sim.latency["total"] - t0) * 1000.0 / sim.n_users)
        em.update(res.info, res.terminated, res.truncated, rows=None if sim.n_users == n_users else sim.uid)
        shown = res.info["slate"].item[active]
        np.add.at(creator_imp, sim.corpus.catalog.creator[shown[shown >= 0]], 1.0)
        knob_sum += action[active].sum(axis=0)
        for g, idx in state_buckets(obs[active], sim.layout).items():
            np.add.at(state_sum[g], idx, action[active])
            state_n[g] += np.bincount(idx, minlength=len(STATE_GROUPS[g]))
        n_act += int(active.sum())
        obs = res.obs
        steps += 1
        ended = res.terminated | res.truncated
        if not ended.any() or em.done:
            continue
        if finished == "replace":
            obs = np.where(ended[:, None], sim.reset(ended), obs)
        else:
            sim.retire(ended)
            obs = obs[~ended]
    per_user = em.per_user()
    ms = np.asarray(step_ms)
    population = {"creators/exposure_gini": gini(creator_imp),
                  "perf/request_ms_p50": float(np.percentile(ms, 50)) if ms.size else 0.0,
                  "perf/request_ms_p99": float(np.percentile(ms, 99)) if ms.size else 0.0,
                  "perf/rollout_requests": float(steps)}
    with np.errstate(invalid="ignore", divide="ignore"):
        by_state = {g: state_sum[g] / state_n[g][:, None] for g in STATE_GROUPS}
    return RunResult(policy.name, seed, per_user, population, em.day_active.mean(axis=0), knob_sum / max(n_act, 1),
                     by_state, state_n)


class RolloutStore:
    """Finished rollouts on disk, one ``<key>.npz`` per job, so that an evaluation that was interrupted
    resumes where it stopped and a later run that asks for the same rollout (e.g. ``main.py --shift`` after
    ``main.py``) reads it instead of simulating it again.

    The key is the sha256 of everything a rollout's result depends on: the policy's
    :func:`~agents.policies.policy_fingerprint` (class, name, parameters), the world's config, the users,
    the seed, ``finished``, the digest of the ``envs``, ``rankers``, ``offline_data`` and ``agents``
    sources and the learned rankers served (:func:`envs.learned.entry_digest`: their checkpoints' sha256),
    so any edit of the code, the policy or the rankers makes a new rollout. A policy without a fingerprint is
    never stored. Files are written atomically; one that cannot be read (truncated, damaged, another
    format) is moved aside as ``.stale-<n>`` with a message and the rollout is run again.
    """

    FORMAT = 1
    PACKAGES: tuple[str, ...] = ("envs", "rankers", "offline_data", "agents")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, job: RolloutJob) -> str | None:
        fp = policy_fingerprint(job.policy)
        if fp is None:
            return None
        from envs.learned import code_digest, entry_digest

        served = job.cfg.replace(**job.policy.env_overrides) if job.policy.env_overrides else job.cfg
        blob = {"format": self.FORMAT, "policy": fp, "config": job.cfg.to_dict(), "users": job.n_users,
                "seed": job.seed, "finished": job.finished, "code": code_digest(packages=self.PACKAGES),
                "rankers": entry_digest(served)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def path(self, job: RolloutJob) -> Path | None:
        key = self.key(job)
        return None if key is None else self.root / f"{job.policy.name}-{job.cfg.preset}-seed{job.seed}-{key}.npz"

    def load(self, path: Path | None) -> RunResult | None:
        """The result stored at ``path`` (a :meth:`path`), or None (none there, no fingerprint, or unreadable: set
        aside)."""
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != self.FORMAT or meta.get("key") != path.stem.rsplit("-", 1)[-1]:
                    raise ValueError(f"format {meta.get('format')!r}, key {meta.get('key')!r}")
                arrays = {k: z[k] for k in z.files if k != "meta"}

            def group(prefix: str) -> dict[str, Array]:
                return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

            return RunResult(meta["policy"], int(meta["seed"]), group("per_user/"),
                             {k: float(v) for k, v in meta["population"].items()}, arrays["retention_by_day"],
                             arrays["knob_means"], group("knob_by_state/"), group("state_counts/"))
        except Exception as err:
            set_aside(path, f"stored rollout {path} cannot be read ({type(err).__name__}: {err})",
                      then="running it again")
            return None

    def save(self, path: Path | None, job: RolloutJob, result: RunResult) -> Path | None:
        """Stores ``job``'s ``result`` at ``path`` (its :meth:`path`; None: not stored)."""
        if path is None:
            return None
        meta = {"format": self.FORMAT, "key": path.stem.rsplit("-", 1)[-1], "policy": result.policy,
                "seed": result.seed, "population": result.population, "preset": job.cfg.preset,
                "users": job.n_users, "finished": job.finished}
        arrays = {"meta": np.asarray(json.dumps(meta)), "retention_by_day": result.retention_by_day,
                  "knob_means": result.knob_means,
                  **{f"per_user/{k}": v for k, v in result.per_user.items()},
                  **{f"knob_by_state/{k}": v for k, v in result.knob_by_state.items()},
                  **{f"state_counts/{k}": v for k, v in result.state_counts.items()}}
        # numpy's stub lets a **dict fill savez's allow_pickle flag; no key here is named that
        return atomic_write_with(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


@dataclass(frozen=True)
class RolloutJob:
    """One rollout to run: a policy on the world of ``seed`` (``rollout``'s arguments). With a ``store``
    (a :class:`RolloutStore` directory) a rollout already stored there is read instead of run, and a new
    one is stored as soon as it ends (by the process that ran it)."""

    policy: Policy
    cfg: FeedConfig
    n_users: int
    seed: int
    finished: str = "replace"
    store: Path | None = None

    def stored(self) -> bool:
        """Whether ``store`` holds this rollout's result."""
        path = None if self.store is None else RolloutStore(self.store).path(self)
        return path is not None and path.is_file()

    def run(self) -> RunResult:
        store = None if self.store is None else RolloutStore(self.store)
        path = None if store is None else store.path(self)  # the key hashes the policy's parameters: once
        if store is not None and (hit := store.load(path)) is not None:
            return hit
        result = rollout(self.policy, self.cfg, self.n_users, self.seed, self.finished)
        if store is not None:
            store.save(path, self, result)
        return result


_FORKED: dict[int, Sequence[RolloutJob]] = {}  # job lists that forked workers read (inherited at the fork)
_KEYS = itertools.count()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _forked_worker_init(parent: int, forked_by_main_thread: bool) -> None:
    """A forked worker runs torch on one thread, takes SIGTERM's default action and dies with its parent.

    Torch: the parent's OpenMP pool (torch's intra-op threads, there whenever torch ran a parallel op with
    more than one thread, e.g. during training) does not survive a fork, and a child's first multi-threaded op
    waits for those threads forever (seen as a hang).

    SIGTERM: a handler the parent installed (:func:`exit_on_sigterm`) is inherited by the fork; in a worker it
    would turn the signal into an exception that the pool reports as the job's result, and the worker would
    live on. A worker just ends.

    The parent: if it dies without stopping its workers (SIGKILL, a crash, a SIGTERM without a handler), a
    worker would run on, orphaned, for good. On Linux the kernel sends it SIGKILL when the thread that forked
    it ends (``prctl(PR_SET_PDEATHSIG)``; used when that thread was the main thread, i.e. the process);
    elsewhere a thread polls ``os.getppid()``."""
    import signal

    import torch

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    torch.set_num_threads(1)
    _die_with_parent(parent, forked_by_main_thread)


def _die_with_parent(parent: int, forked_by_main_thread: bool) -> None:
    """Ends this process when process ``parent`` ends (see :func:`_forked_worker_init`)."""
    import os
    import signal
    import sys

    if sys.platform.startswith("linux") and forked_by_main_thread:
        import ctypes

        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
        if armed:
            if os.getppid() != parent:  # the parent died before the signal was armed
                os._exit(1)
            return
    import threading

    threading.Thread(target=_watch_parent, args=(parent,), name="feedgym-watch-parent", daemon=True).start()


def _watch_parent(parent: int, every_s: float = 0.5) -> None:
    import os
    import time

    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


def exit_on_sigterm() -> None:
    """From now on SIGTERM ends this process and every process it started: the handler terminates the
    child processes (the forked evaluation workers, a learned-ranker build) and raises ``SystemExit(143)``
    (128 + SIGTERM), so ``finally`` blocks and exit handlers run (the pools are closed, files flushed). A
    second SIGTERM during that cleanup kills at once. Call it from a script's main thread (``scripts/main.py``);
    workers forked later restore SIGTERM's default action (:func:`_forked_worker_init`)."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        import multiprocessing as mp

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for child in mp.active_children():
            child.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _forked_rollout(key: int, i: int) -> RunResult:
    return _FORKED[key][i].run()


class BackgroundRollouts:
    """Rollouts running in ``workers`` forked processes while the caller goes on (the main job trains its
    agents while the baselines are evaluated on the other core).

    The jobs' policies are inherited by the fork, not pickled, so they must exist when this is made.
    Every rollout depends only on its job, so the results are those of running the jobs one by one;
    :meth:`results` waits for them and returns them in job order. A worker that dies (killed, out of
    memory) fails the rollouts still to come with an error that names the first of them, instead of
    leaving the caller waiting (``concurrent.futures`` marks such a pool broken)."""

    def __init__(self, jobs: Sequence[RolloutJob], workers: int = 1) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if workers < 1:
            raise ValueError(f"BackgroundRollouts: workers={workers} must be >= 1")
        for j in jobs:
            _check_finished("BackgroundRollouts", j.finished)
        self.jobs = list(jobs)
        self._key = next(_KEYS)
        _FORKED[self._key] = self.jobs  # read by the workers, forked after this line
        import os
        import threading

        # the workers are forked by this thread (the first submit), so they die with it (_forked_worker_init)
        by_main = threading.current_thread() is threading.main_thread()
        self._pool = ProcessPoolExecutor(max(1, min(workers, len(self.jobs))), mp_context=mp.get_context("fork"),
                                         initializer=_forked_worker_init, initargs=(os.getpid(), by_main))
        self._pending = [self._pool.submit(_forked_rollout, self._key, i) for i in range(len(self.jobs))]

    def results(self, bar: Any = None) -> list[RunResult]:
        """Waits for every rollout, in job order (advancing ``bar``, a tqdm bar, as each is collected); a
        rollout's exception is raised here, and so is a worker's death."""
        from concurrent.futures.process import BrokenProcessPool

        out = []
        try:
            for job, r in zip(self.jobs, self._pending, strict=True):
                try:
                    out.append(r.result())
                except BrokenProcessPool as e:
                    raise RuntimeError(f"an evaluation worker died (killed or out of memory?) before the rollout of "
                                       f"{job.policy.name} on seed {job.seed} finished; its results are lost") from e
                if bar is not None:
                    bar.update(1)
        finally:
            self.close()
        return out

    def close(self) -> None:
        """Stops the workers, running rollouts included; returns once every worker has been reaped."""
        procs = list((getattr(self._pool, "_processes", None) or {}).values())  # no public terminate in 3.11
        manager = getattr(self._pool, "_executor_manager_thread", None)  # shutdown(wait=False) forgets it
        self._pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():  # ignored SIGTERM
                p.kill()
                p.join()
        # The pool's manager thread reaps the workers too; a join here that lost that race sees the
        # process as alive until the thread has recorded its exit code, so wait for the thread.
        if manager is not None and manager.is_alive():
            manager.join(timeout=10)
        _FORKED.pop(self._key, None)


def run_jobs(jobs: Sequence[RolloutJob], workers: int = 1, progress: bool = True, desc: str = "evaluate",
             background: Sequence[BackgroundRollouts] = ()) -> list[RunResult]:
    """Runs ``jobs`` (in ``workers`` forked processes when > 1) and waits for the ``background`` rollouts
    already under way; returns the results of ``jobs`` then of each background set, each in job order."""
    if workers < 1:
        raise ValueError(f"run_jobs: workers={workers} must be >= 1")
    n_bg = sum(len(b.jobs) for b in background)
    try:
        with tqdm(total=len(jobs) + n_bg, desc=desc, disable=not progress) as bar:
            if workers == 1 or len(jobs) <= 1:
                out = []
                for j in jobs:
                    bar.set_postfix_str(f"{j.policy.name} seed={j.seed}")
                    out.append(j.run())
                    bar.update(1)
            else:
                out = BackgroundRollouts(jobs, workers).results(bar)
            for b in background:
                out += b.results(bar)
    finally:  # an error stops every rollout still running
        for b in background:
            b.close()
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
             progress: bool = True, workers: int = 1, finished: str = "replace",
             store: str | Path | None = None) -> Comparison:
    """Runs every policy on every seed (common random numbers) and returns all runs (seed-major, in
    policy order). ``workers > 1`` runs the rollouts in that many forked processes (the policies are
    inherited, not pickled); every rollout depends only on its (policy, seed), so the result is the
    same for any number of workers. Each worker runs torch on one thread (:func:`_forked_worker_init`).
    ``finished``: what takes the place of a user whose episode ended (:func:`rollout`); ``store``: a
    :class:`RolloutStore` directory (rollouts found there are read, new ones written as they end)."""
    _check_finished("evaluate", finished)
    check_seeds(seeds, "evaluate: seeds")
    check_policies(policies)
    where = None if store is None else Path(store)
    jobs = [RolloutJob(policies[i], cfg, n_users, seed, finished, where) for seed in seeds
            for i in range(len(policies))]
    return Comparison(runs=run_jobs(jobs, workers, progress))


def bootstrap_ci(x: Array, seed: int = 0, reps: int = 2000) -> tuple[float, float, float]:
    """Mean of ``x`` and its 95 % percentile-bootstrap interval."""
    x = np.asarray(x, np.float64)
    m = float(x.mean())
    if x.size < 2 or np.all(x == x[0]):
        return m, m, m
    r = stats.bootstrap((x,), np.mean, n_resamples=reps, confidence_level=0.95, method="percentile",
                        vectorized=True, rng=np.random.default_rng(seed))
    return m, float(r.confidence_interval.low), float(r.confidence_interval.high)


def iqm(x: Array) -> float:
    """Interquartile mean: the mean of the middle 50 % of all values (rliable's ``aggregate_iqm``,
    scipy's ``trim_mean`` cutting 25 % at each end, ``int(0.25 n)`` values each side)."""
    from rliable.metrics import aggregate_iqm

    return float(aggregate_iqm(np.asarray(x, np.float64)))


def _pooled(strata: Sequence[Array], who: str) -> tuple[list[Array], Array]:
    """The non-empty strata as flat float64 arrays, and all their values pooled."""
    parts = [p for p in (np.asarray(s, np.float64).ravel() for s in strata) if p.size]
    if not parts:
        raise ValueError(f"{who} needs at least one non-empty stratum")
    return parts, np.concatenate(parts)


def stratified_iqm_ci(strata: Sequence[Array], seed: int = 0, reps: int = 2000,
                      max_chunk: int = 4_000_000) -> tuple[float, float, float]:
    """IQM of all values of ``strata`` and its 95 % stratified percentile-bootstrap interval.

    The estimator of rliable's ``get_interval_estimates(..., method="percentile")`` with its
    ``StratifiedBootstrap`` on a (runs x tasks) matrix: each replicate resamples, with replacement,
    the values *within* each stratum (here: the users of one evaluation seed) and takes the IQM of
    the pooled resample. Vectorised in numpy (rliable's loop over replicates takes ~0.5 s per
    interval; a test checks the two agree). Strata may differ in size.

    Args:
        strata: one 1-D float array per stratum (e.g. per-user paired differences of one seed).
        seed: seed of the resampling generator.
        reps: bootstrap replicates.
        max_chunk: most resampled values held in memory at once.

    Returns:
        (iqm, lo, hi); a constant sample gives (v, v, v).
    """
    parts, full = _pooled(strata, "stratified_iqm_ci")
    point = iqm(full)
    if full.size < 2 or np.all(full == full[0]):
        return point, point, point
    rng = np.random.default_rng(seed)
    boot = np.empty(reps)
    step = max(1, max_chunk // full.size)
    for start in range(0, reps, step):
        r = min(step, reps - start)
        sample = np.concatenate([s[rng.integers(0, s.size, (r, s.size))] for s in parts], axis=1)
        boot[start:start + r] = stats.trim_mean(sample, 0.25, axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return point, float(lo), float(hi)


def hierarchical_ci(strata: Sequence[Array], seed: int = 0, reps: int = 2000) -> tuple[float, float, float]:
    """Mean of all values of ``strata`` and its 95 % two-level percentile-bootstrap interval.

    Each replicate draws as many strata as there are, with replacement (the worlds: evaluation seeds),
    then resamples the values *within* each drawn stratum (the users of that world), and takes the
    mean of the pooled resample. Users of one world share its trajectory (its creators, its counters,
    what trends), which a policy changes, so they are not independent draws: this interval carries
    the world-to-world spread that resampling users alone misses. With few strata it is coarse (two
    seeds give three distinct stratum draws); a wide interval then says "run more seeds".

    Returns:
        (mean, lo, hi); a single stratum gives the within-stratum bootstrap.
    """
    parts, full = _pooled(strata, "hierarchical_ci")
    point = float(full.mean())
    if full.size < 2 or np.all(full == full[0]):
        return point, point, point
    rng = np.random.default_rng(seed)
    k = len(parts)
    pick = rng.integers(0, k, (reps, k))  # which stratum fills each slot of each replicate
    sums = np.zeros(reps)
    counts = np.zeros(reps)
    for j, s in enumerate(parts):
        hit = pick == j  # (reps, k) slots filled by stratum j
        n_hit = int(hit.sum())
        if not n_hit:
            continue
        boot_sums = np.empty(n_hit)
        step = max(1, 4_000_000 // s.size)
        for a in range(0, n_hit, step):
            r = min(step, n_hit - a)
            boot_sums[a:a + r] = s[rng.integers(0, s.size, (r, s.size))].sum(axis=1)
        rows = np.nonzero(hit)[0]
        np.add.at(sums, rows, boot_sums)
        np.add.at(counts, rows, s.size)
    lo, hi = np.percentile(sums / counts, [2.5, 97.5])
    return point, float(lo), float(hi)


def summarize(comp: Comparison, metrics: Sequence[str] | None = None, reps: int = 2000) -> list[dict[str, Any]]:
    """One row per (metric, policy): mean with 95 % CI and the paired difference from the baseline.

    Row keys: ``metric``, ``policy``, ``mean``, ``lo``, ``hi`` (95 % percentile bootstrap over
    users); for every policy but the baseline also ``diff``, ``diff_lo``, ``diff_hi``,
    ``significant`` (the mean per-user paired difference from the baseline, same users and noise,
    and whether its 95 % CI excludes 0) and ``iqm``, ``iqm_lo``, ``iqm_hi``, ``iqm_significant``:
    the interquartile mean of the same paired differences with its 95 % stratified bootstrap CI
    (users resampled within each seed; :func:`stratified_iqm_ci`), robust to a few users with
    extreme differences. For the 0/1 metrics in :data:`BINARY_METRICS` the paired difference is
    -1/0/+1 and mostly 0, so its IQM says nothing: those four keys are ``None`` there.
    Paired rows also carry ``world_lo``, ``world_hi``, ``world_significant``: the 95 % interval of
    the same mean difference with worlds (seeds) resampled before users (:func:`hierarchical_ci`),
    which the verdicts use (:mod:`agents.verdict`).
    Population metrics (one value per world: :data:`POPULATION_METRICS`) are not bootstrapped: their rows
    carry ``spread = "seeds"``, ``lo``/``hi`` = min/max over the seeds and, for every policy but the baseline,
    ``diff`` = the mean over seeds of the policy's value minus the baseline's in the same world,
    ``diff_lo``/``diff_hi`` = the smallest and largest of those per-world differences and ``n_seeds``; no
    significance (``significant`` is None): with a handful of worlds, "lower in every world" is what they say.
    """
    metrics = list(metrics) if metrics is not None else list(METRICS)
    rows: list[dict[str, Any]] = []
    base = comp.baseline if comp.baseline in comp.policies else comp.policies[0]
    for metric in metrics:
        xb = comp.per_user(base, metric)
        for pol in comp.policies:
            x = comp.per_user(pol, metric)
            m, lo, hi = bootstrap_ci(x, reps=reps)
            row = {"metric": metric, "policy": pol, "mean": m, "lo": lo, "hi": hi}
            if pol != base:
                d, dlo, dhi = bootstrap_ci(x - xb, reps=reps)
                row.update(diff=d, diff_lo=dlo, diff_hi=dhi, significant=bool(dlo > 0 or dhi < 0))
                strata = comp.paired_per_seed(pol, metric, base)
                _, wlo, whi = hierarchical_ci(strata, reps=reps)
                row.update(world_lo=wlo, world_hi=whi, world_significant=bool(wlo > 0 or whi < 0))
                if metric in BINARY_METRICS:
                    row.update(iqm=None, iqm_lo=None, iqm_hi=None, iqm_significant=None)
                else:
                    q, qlo, qhi = stratified_iqm_ci(strata, reps=reps)
                    row.update(iqm=q, iqm_lo=qlo, iqm_hi=qhi, iqm_significant=bool(qlo > 0 or qhi < 0))
            rows.append(row)
    for metric in POPULATION_METRICS:
        if not all(metric in r.population for r in comp.runs):  # saved by a version that did not measure it
            continue
        base_vals = comp.population_per_seed(base, metric)
        for pol in comp.policies:
            vals = comp.population_per_seed(pol, metric)
            row = {"metric": metric, "policy": pol, "mean": float(vals.mean()), "lo": float(vals.min()),
                   "hi": float(vals.max()), "spread": "seeds", "n_seeds": int(vals.size)}
            if pol != base and vals.size == base_vals.size:
                d = vals - base_vals
                row.update(diff=float(d.mean()), diff_lo=float(d.min()), diff_hi=float(d.max()), significant=None)
            rows.append(row)
    return rows

