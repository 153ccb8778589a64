"""SIGTERM to ``scripts/main.py`` ends every process the job started, its private Ray included, and a job killed
outright (SIGKILL) leaves no Ray process behind either (a forked worker of the pool this replaced used to stay alive
for good, holding the run's files open)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import alive, descendants, process_state

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists() or not hasattr(os, "fork"),
                                reason="reads the process table from /proc")

# Runs scripts/main.py as ``__main__`` on tiny with a private Ray (--executor ray), its baseline's rollout running
# on Ray while the agents train, with that baseline's policy and the CEM stage replaced by waits that first leave a
# marker file: the job is then at a known point, with one Ray worker busy, when the test signals it. The waiting
# policy is defined here (``__main__``), so Ray pickles it by value for its worker.
DRIVER = textwrap.dedent("""
    import os, runpy, sys, time
    import agents.cem, agents.policies
    marks, ROOT = sys.argv[1], sys.argv[3]

    def wait(tag):
        open(os.path.join(marks, f"{tag}.{os.getpid()}"), "w").close()
        time.sleep(600)

    class Waiter(agents.policies.WeightedSum):
        def act(self, obs):
            wait("worker")

    agents.policies.make_baseline = lambda *a, **k: Waiter()
    agents.cem.cem_tune = lambda *a, **k: wait("driver")
    sys.argv = ["scripts/main.py", "--preset", "tiny", "--seeds", "0", "--baselines", "weighted_sum",
                "--executor", "ray", "--workers", "2", "--no-shift", "--no-progress", "--users", "4",
                "--out", sys.argv[2]]
    runpy.run_path(os.path.join(ROOT, "scripts", "main.py"), run_name="__main__")
""")


def _wait(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def _start_job(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """The driver process and its busy worker's pid, once both are waiting."""
    marks = tmp_path / "marks"
    marks.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(marks), str(tmp_path / "out"), str(ROOT)],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)

    def ready() -> bool:
        names = [p.name for p in marks.iterdir()]
        return any(n.startswith("driver.") for n in names) and any(n.startswith("worker.") for n in names)

    if not _wait(lambda: ready() or proc.poll() is not None, 240) or proc.poll() is not None:
        proc.kill()
        proc.wait()
        pytest.fail(f"the job did not reach its waits (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
    worker = int(next(p.name for p in marks.iterdir() if p.name.startswith("worker.")).split(".")[1])
    assert worker in descendants(proc.pid)  # the rollout runs in a Ray worker the job started
    return proc, worker


def _cleanup(proc: subprocess.Popen, pids: set[int]) -> None:
    """Kills whatever a failing run left behind (never the test process)."""
    for pid in pids:
        if pid != os.getpid() and alive(pid):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_sigterm_ends_the_job_and_its_workers(tmp_path: Path) -> None:
    proc, worker = _start_job(tmp_path)
    started = descendants(proc.pid)
    assert len(started) >= 3  # Ray's GCS, raylet and the worker at least
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert _wait(lambda: not any(alive(p) for p in started), 10), \
            {p: process_state(p) for p in started if alive(p)}  # no process the job started survives it
        assert not alive(worker)
        assert proc.returncode == 128 + signal.SIGTERM  # it exited through SystemExit: its cleanup ran
    finally:
        _cleanup(proc, started)


def test_a_killed_job_leaves_no_ray_process(tmp_path: Path) -> None:
    """SIGKILL leaves the job no chance to stop its private Ray: Ray ends its raylet, GCS and workers with the
    driver, and the executor's watcher ends the rest (Ray's agents)."""
    proc, worker = _start_job(tmp_path)
    started = descendants(proc.pid)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert _wait(lambda: not any(alive(p) for p in started), 20), {p: process_state(p) for p in started if alive(p)}
        assert not alive(worker)
    finally:
        _cleanup(proc, started)
