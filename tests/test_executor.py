"""The executors: in-process and Ray give the same bits; faults (a killed worker, a failing job, an unreachable
cluster) and the processes a private Ray starts. One test starts Ray (2 CPUs) and stops it."""

from __future__ import annotations

import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from agents.evaluation import PendingRollouts, evaluate, run_jobs
from agents.policies import TrueScores, WeightedSum, make_baseline
from agents.rollout_store import RolloutStore
from agents.rollouts import RolloutJob, RunResult
from envs.config import make_config
from offline_data import GaussianKnobs, collect
from offline_data.executor import ClusterError, LocalExecutor, RayExecutor, make_executor
from tests.helpers import alive, descendants


@pytest.fixture(scope="module")
def cfg():
    return make_config("tiny", horizon_days=2.0, churn_days=2.0)


def _same_run(a: RunResult, b: RunResult) -> None:
    """Equal bits, but the wall-time ``perf/request_ms_*`` (no two rollouts share them)."""
    def pop(r: RunResult) -> dict[str, float]:
        return {k: v for k, v in r.population.items() if not k.startswith("perf/request_ms")}

    assert (a.policy, a.seed, pop(a)) == (b.policy, b.seed, pop(b))
    for got, want in ((a.per_user, b.per_user), (a.knob_by_state, b.knob_by_state), (a.state_counts, b.state_counts)):
        assert got.keys() == want.keys()
        for k in got:
            assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), (a.policy, a.seed, k)
    assert a.retention_by_day.tobytes() == b.retention_by_day.tobytes()
    assert a.knob_means.tobytes() == b.knob_means.tobytes()


class KilledOnce(WeightedSum):
    """The zero action, but the first process that serves it dies (SIGKILL, as the out-of-memory killer does)."""

    name = "killed_once"

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def fingerprint(self) -> dict:
        return {**super().fingerprint(), "marker": str(self.marker)}

    def act(self, obs):
        if not self.marker.exists():
            self.marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return super().act(obs)


def _double(common: int, job: int) -> int:
    return common * job


def test_local_executor_maps_in_order_and_reports_each_result():
    seen = []
    with LocalExecutor() as ex:
        assert ex.map(math.sqrt, [1.0, 4.0, 9.0]) == [1.0, 2.0, 3.0]
        assert ex.map(_double, [1, 2, 3], common=10, on_result=lambda i, r: seen.append((i, r))) == [10, 20, 30]
        with pytest.raises(ValueError, match="math domain error"):
            ex.map(math.sqrt, [-1.0])
    assert seen == [(0, 10), (1, 20), (2, 30)]
    with pytest.raises(ValueError, match="--ray-address x:1 needs --executor ray"):
        make_executor("local", "x:1")
    with pytest.raises(ValueError, match="--executor 'dask' is invalid"):
        make_executor("dask")


def test_an_unreachable_cluster_is_a_clear_error_at_once():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=rf"cannot reach the Ray cluster at --ray-address 127.0.0.1:{port}"):
        make_executor("ray", f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 30
    import ray

    assert not ray.is_initialized()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")
def test_ray_gives_the_local_bits_retries_a_killed_worker_and_leaves_no_process(cfg, tmp_path: Path):
    """A private Ray of 2 CPUs: the evaluation and a sharded collection give the in-process bytes; a job's own
    error is raised as its class; its workers run at the driver's priority; a worker killed mid-rollout is
    retried, each finished rollout is stored by the driver and not run again; closing the executor ends every
    process Ray started."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the tests are not installed on workers
    pols = [WeightedSum(), make_baseline("random", seed=7), TrueScores()]
    local = evaluate(pols, cfg, 4, (0, 1), progress=False)
    kw = {"n_users": 4, "n_steps": 12, "seed": 3, "worlds": 2}
    local_ds = collect(GaussianKnobs(0.3), cfg, **kw)
    marker = tmp_path / "killed"
    store = tmp_path / "rollouts"
    jobs = [RolloutJob(WeightedSum(), cfg, 4, 1, store=store), RolloutJob(KilledOnce(marker), cfg, 4, 0, store=store)]
    before = descendants(os.getpid())
    with RayExecutor(workers=2) as ex:
        assert ex.workers == 2 and ray.is_initialized()
        remote = evaluate(pols, cfg, 4, (0, 1), progress=False, executor=ex)
        assert [(r.policy, r.seed) for r in remote.runs] == [(r.policy, r.seed) for r in local.runs]
        for a, b in zip(local.runs, remote.runs, strict=True):
            _same_run(a, b)
        ds = collect(GaussianKnobs(0.3), cfg, **kw, executor=ex)
        assert ds.meta == local_ds.meta
        for part in ("transitions", "impressions"):
            for k, v in vars(getattr(local_ds, part)).items():
                got = getattr(getattr(ds, part), k)
                assert got.dtype == v.dtype and got.tobytes() == v.tobytes(), (part, k)
        with pytest.raises(ValueError, match="math domain error"):
            ex.map(math.sqrt, [-1.0])
        assert ex.map(os.nice, [0]) == [os.nice(0)]  # the workers run at the driver's priority (Ray's default: 15)
        again, killed = run_jobs(jobs, ex, progress=False)
        assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker died running it
        _same_run(killed, RunResult(**{**vars(local.runs[0]), "policy": "killed_once"}))
        _same_run(again, local.runs[3])  # weighted_sum on seed 1
        assert all(RolloutStore(store).holds(j) for j in jobs)
        assert PendingRollouts(jobs, ex).n_stored == 2  # read back, nothing sent again
        started = descendants(os.getpid()) - before
    assert not ray.is_initialized()
    assert started, "Ray started no process"
    end = time.monotonic() + 15
    while any(alive(p) for p in started) and time.monotonic() < end:
        time.sleep(0.2)
    assert not [p for p in started if alive(p)], "processes Ray started outlived the executor"
    np.testing.assert_array_equal(killed.per_user["retention/retained_30d"],
                                  local.runs[0].per_user["retention/retained_30d"])


def test_a_ppo_policy_travels_without_its_training_env(cfg, tmp_path: Path):
    """What an executor sends of a trained PPO policy: its network and hyperparameters (not the training env and
    rollout buffer the SB3 model holds); it acts and fingerprints bit for bit as the original."""
    import pickle

    from agents.policies import policy_fingerprint
    from agents.ppo import SB3Policy, train_ppo
    from envs.simulator import FeedSimulator

    model = train_ppo(cfg, 256, tmp_path / "ppo", num_envs=4, seed=0)
    pol = SB3Policy(model, "ppo", anchor=np.full(model.action_space.shape[0], 0.1, np.float32))
    blob = pickle.dumps(pol)
    back = pickle.loads(blob)
    import ray.cloudpickle

    assert back.model.get_env() is None and len(blob) < len(ray.cloudpickle.dumps(model)) / 2
    obs = FeedSimulator(cfg, 5, seed=2).reset()
    assert back.act(obs).tobytes() == pol.act(obs).tobytes()
    assert policy_fingerprint(back) == policy_fingerprint(pol)
