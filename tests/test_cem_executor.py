"""CEM on the executor: an iteration is one job per training world, and the search gives the same bits with
``executor=None``, the in-process executor and a private Ray of 2 CPUs, a worker killed mid-iteration included;
the split worlds give the batched simulator's bits. One test starts Ray (2 CPUs) and stops it."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from agents.cem import _GUARDRAIL_COUNTS, CEMResult, _Iteration, _run_world, _WorldJob, cem_tune
from agents.segments import Segmenter
from envs.config import make_config
from envs.world_mix import make_simulator
from offline_data.executor import LocalExecutor, RayExecutor
from rankers.config import N_KNOBS

# watch minutes as the reward: every request earns some, so the candidates' fitness differ within a few requests
# (the default return reward is 0 until a session ends)
CFG = make_config("tiny", horizon_days=2.0, churn_days=2.0, reward={"mode": "engagement"})
# 2 worlds, each rebuilt inside the search (world 0's first life ends at step 3, world 1's at step 7, then every
# 7 steps), paired users: what the main job's search does, small
KW = {"n_candidates": 4, "users_per_candidate": 2, "steps_per_iter": 5, "worlds": 2, "world_steps": 7,
      "elite_frac": 0.5, "init_std": 1.0}
BUDGET = 3 * 4 * 2 * 5  # 3 iterations
SPLITS = (("tenure_days", 7.0),)


def _same(a: CEMResult, b: CEMResult) -> None:
    assert a.steps_used == b.steps_used and a.iter_steps == b.iter_steps and len(a.means) == len(b.means) == 3
    assert a.best_action.dtype == b.best_action.dtype and np.array_equal(a.best_action, b.best_action)
    for x, y in zip(a.means, b.means, strict=True):
        assert x.tobytes() == y.tobytes()
    assert a.history == b.history  # every float of every iteration, NaN aside (there is none: 2 slots per world)


@pytest.fixture(scope="module")
def in_process() -> CEMResult:
    r = cem_tune(CFG, BUDGET, seed=5, **KW)
    assert not np.array_equal(r.means[0], r.means[-1])  # the search moved: equal results are not trivially equal
    return r


def test_the_in_process_executor_gives_the_default_bits(in_process: CEMResult) -> None:
    _same(cem_tune(CFG, BUDGET, seed=5, executor=LocalExecutor(), **KW), in_process)
    other = cem_tune(CFG, BUDGET, seed=6, **KW)
    assert not np.array_equal(other.means[-1], in_process.means[-1])  # the comparison can tell two searches apart


def _batched(seed: int, cands: list[np.ndarray], paired: bool, worlds: int, world_steps: int, steps: int):
    """Each iteration's per-row reward sums and guardrail counts, stepped as the search did before the split: one
    batched simulator (a WorldMix) for every world, reset wherever any row ended."""
    c = cands[0].shape[0]
    b = c * 4
    sim = make_simulator(CFG, b, seed, worlds, world_steps)
    slot = np.arange(b) // c
    if paired:
        sim.key_users(slot)
    obs = sim.reset()
    rows = np.arange(b)
    out = []
    for it, cand in enumerate(cands):
        table = cand[rows % c]
        if paired and it:
            sim.copy_users(slot * c)
            obs = obs[slot * c]
        total, counts = np.zeros(b), {k: np.zeros(b) for k in _GUARDRAIL_COUNTS}
        for _ in range(steps):
            res = sim.step(table)
            total += res.reward
            for k in counts:
                counts[k] += res.info[k]
            obs = res.obs
            done = res.terminated | res.truncated
            if done.any():
                obs = np.where(done[:, None], sim.reset(done), obs)
        out.append((total, counts))
    return out


@pytest.mark.parametrize(("paired", "worlds", "world_steps"), [(True, 2, 4), (False, 1, 4)])
def test_the_split_worlds_give_the_batched_simulators_bits(paired: bool, worlds: int, world_steps: int) -> None:
    """Paired users, or one world: a world's job steps its rows as the batched simulator did (an unpaired search
    over several worlds differs: there an empty reset of one world advanced its users' stream)."""
    c, steps = 3, 5
    rng = np.random.default_rng(0)
    cands = [rng.uniform(-1, 1, (c, N_KNOBS)).astype(np.float32) for _ in range(2)]
    want = _batched(9, cands, paired, worlds, world_steps, steps)
    sizes = [4 * c // worlds] * worlds
    first = np.r_[0, np.cumsum(sizes)].tolist()
    states: list = [None] * worlds
    ended = 0
    for it, cand in enumerate(cands):
        common = _Iteration(CFG, None, cand[:, None, :], steps, paired and it > 0, None, False)
        out = LocalExecutor().map(_run_world, [_WorldJob(k, sizes[k], first[k], 9, worlds, world_steps, paired,
                                                         states[k], it) for k in range(worlds)], common=common)
        states = [o[0] for o in out]
        ended += sum(w.generation for w in states)
        total = np.concatenate([o[1][0] for o in out])
        assert total.tobytes() == want[it][0].tobytes(), it
        for k in _GUARDRAIL_COUNTS:
            assert np.concatenate([o[2][k] for o in out]).tobytes() == want[it][1][k].tobytes(), (it, k)
    assert ended > 0 or world_steps == 0  # the worlds were rebuilt inside the jobs


@dataclass(frozen=True)
class KillsItsWorker(Segmenter):
    """The segmenter of its splits, but the first Ray worker that uses it dies (SIGKILL, as the out-of-memory
    killer does) in the middle of its iteration."""

    marker: str = ""
    driver: int = 0

    def assign(self, obs, layout):
        if os.getpid() != self.driver and not Path(self.marker).exists():
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().assign(obs, layout)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="Ray's private cluster is tested on Linux")
def test_ray_gives_the_in_process_bits_and_a_killed_worker_changes_nothing(in_process: CEMResult,
                                                                           tmp_path: Path) -> None:
    """A private Ray of 2 CPUs: the search's bits are the in-process ones; a worker killed in the middle of an
    iteration has its world's job run again by Ray, from the same pickled world, and the bits stay. (With 1 CPU
    the jobs only run one after the other; the driver joins them in world order either way.)"""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tests are not installed on workers
    seg_kw = {**KW, "world_steps": 0}
    local_seg = cem_tune(CFG, BUDGET, seed=5, segments=Segmenter(SPLITS), **seg_kw)
    marker = tmp_path / "killed"
    killer = KillsItsWorker(SPLITS, str(marker), os.getpid())
    with RayExecutor(workers=2) as ex:
        assert ex.workers == 2
        _same(cem_tune(CFG, BUDGET, seed=5, executor=ex, **KW), in_process)
        killed = cem_tune(CFG, BUDGET, seed=5, segments=killer, executor=ex, **seg_kw)
    assert not ray.is_initialized()
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died running a job
    _same(killed, local_seg)
