"""Where independent jobs run: in this process (the default) or on Ray, behind one interface.

A study is many independent jobs (rollouts of policies x worlds x seeds, CEM candidates, data-collection
shards, sweep points). An :class:`Executor` maps a function over a list of picklable jobs and returns the
results in job order, whatever ran them::

    with make_executor("ray", workers=2) as ex:          # or make_executor() for in-process
        results = ex.map(run_one, jobs, progress=True)   # == [run_one(j) for j in jobs]
        results = ex.map(score, jobs, common=big)        # == [score(big, j) for j in jobs]; big is sent once

- :class:`LocalExecutor` runs the jobs one after another in this process (no process is started).
- :class:`RayExecutor` runs them as Ray core tasks, one CPU each (Ray sets ``OMP_NUM_THREADS=1`` in them). With no
  address it starts a private Ray on this machine (``workers`` CPUs, bound to 127.0.0.1, dashboard and usage
  reporting off, a 512 MiB object store) and stops it on :meth:`~Executor.close`; ``address="auto"`` or
  ``host:port`` joins a running cluster (``ray start --head`` there) and only disconnects from it.

``fn`` must be importable where the job runs: a module-level function of an installed package (``envs``,
``rankers``, ``offline_data``, ``agents``), not one of ``scripts/``. A result depends only on ``fn`` and its job,
never on the executor or the number of workers: the two executors give byte-identical results (tested).

Faults. A Ray worker that dies mid-task (killed, out of memory) is retried (``retries`` times) by Ray; an
exception raised by ``fn`` is raised by :meth:`~Executor.map` as it is (Ray's wrapper is an instance of the cause's
class). ``on_result(i, result)`` is called in the driver as each job finishes (in finishing order), so the caller
can store it at once (the evaluation's rollout store does: a job killed later does not lose the others). An error
or an interrupt (Ctrl-C, or SIGTERM with :func:`exit_on_sigterm`) in the driver cancels every task still queued
or running and, for a private Ray, stops its processes. A cluster that cannot be reached or is lost raises
:class:`ClusterError`, which says so.

This module is the lowest layer that runs jobs (``offline_data.collect`` runs its shards on it): it imports no
other feedgym package, and nothing of Ray until a :class:`RayExecutor` is made.
"""

from __future__ import annotations

import contextlib
import copy
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from tqdm.auto import tqdm

EXECUTORS: tuple[str, ...] = ("local", "ray")
#: Object store of a private Ray (Ray's default is 30 % of the RAM): rollout results are small.
OBJECT_STORE_MB = 512
_NO_COMMON = object()


class ClusterError(RuntimeError):
    """The Ray cluster cannot be reached, or was lost while jobs ran."""


class JobError(RuntimeError):
    """A job could not finish for a reason outside its function (its worker kept dying)."""


def _label(job: Any, i: int) -> str:
    """How messages name a job: its ``label`` attribute, else its index."""
    lab = getattr(job, "label", None)
    return str(lab) if lab else f"job {i}"


def _call(fn: Callable[..., Any], has_common: bool, common: Any, job: Any) -> Any:
    return fn(common, job) if has_common else fn(job)


class Batch:
    """Jobs handed to an executor (:meth:`Executor.start`); :meth:`results` waits for them, :meth:`cancel` stops
    them."""

    def __init__(self, jobs: Sequence[Any]) -> None:
        self.jobs = list(jobs)

    def results(self, bar: Any = None) -> list[Any]:
        """Every job's result, in job order (advancing ``bar``, a tqdm bar, as each finishes)."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Stops the jobs that have not finished (their results are dropped)."""


class Executor:
    """Runs independent jobs; see the module docstring. Use it as a context manager (or call :meth:`close`)."""

    kind: str = "base"
    workers: int = 1
    """Jobs that can run at once."""

    def start(self, fn: Callable[..., Any], jobs: Sequence[Any], *, common: Any = _NO_COMMON,
              on_result: Callable[[int, Any], None] | None = None) -> Batch:
        """Hands ``jobs`` over without waiting (on Ray they run while the caller goes on; in-process they run when
        :meth:`Batch.results` is called)."""
        raise NotImplementedError

    def map(self, fn: Callable[..., Any], jobs: Sequence[Any], *, common: Any = _NO_COMMON,
            on_result: Callable[[int, Any], None] | None = None, progress: bool = False, desc: str = "jobs") -> list:
        """``[fn(job) for job in jobs]`` (``[fn(common, job) ...]`` with ``common``), in job order."""
        batch = self.start(fn, jobs, common=common, on_result=on_result)
        try:
            with tqdm(total=len(batch.jobs), desc=desc, disable=not progress) as bar:
                return batch.results(bar)
        finally:
            batch.cancel()

    def close(self) -> None:
        """Stops whatever this executor started."""

    def describe(self) -> str:
        return f"{self.kind} executor, {self.workers} worker(s)"

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _LocalBatch(Batch):
    def __init__(self, fn: Callable[..., Any], jobs: Sequence[Any], common: Any,
                 on_result: Callable[[int, Any], None] | None) -> None:
        super().__init__(jobs)
        self._fn, self._common, self._on_result = fn, common, on_result
        self._done: list[Any] = []

    def results(self, bar: Any = None) -> list[Any]:
        for i in range(len(self._done), len(self.jobs)):
            if bar is not None:
                bar.set_postfix_str(_label(self.jobs[i], i))
            r = _call(self._fn, self._common is not _NO_COMMON, self._common, self.jobs[i])
            self._done.append(r)
            if self._on_result is not None:
                self._on_result(i, r)
            if bar is not None:
                bar.update(1)
        return list(self._done)


class LocalExecutor(Executor):
    """Every job in this process, one after another, in job order."""

    kind = "local"
    workers = 1

    def start(self, fn: Callable[..., Any], jobs: Sequence[Any], *, common: Any = _NO_COMMON,
              on_result: Callable[[int, Any], None] | None = None) -> Batch:
        return _LocalBatch(fn, jobs, common, on_result)


class _RayBatch(Batch):
    def __init__(self, ex: RayExecutor, fn: Callable[..., Any], jobs: Sequence[Any], common: Any,
                 on_result: Callable[[int, Any], None] | None) -> None:
        super().__init__(jobs)
        import ray

        self._ex, self._on_result = ex, on_result
        has_common = common is not _NO_COMMON
        common_ref = ray.put(common) if has_common else None  # sent once, not once per job
        task = ex.task.options(max_retries=ex.retries, num_cpus=1)
        self._refs = [task.remote(fn, has_common, common_ref, job) for job in self.jobs]
        self._out: dict[int, Any] = {}
        ex._live.append(self)

    def results(self, bar: Any = None) -> list[Any]:
        import ray
        from ray import exceptions as rx

        index = {ref: i for i, ref in enumerate(self._refs) if i not in self._out}
        pending = list(index)
        try:
            while pending:
                # short waits: the driver returns to Python often, so Ctrl-C and SIGTERM's handler act at once
                ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
                for ref in ready:
                    i = index[ref]
                    try:
                        r = ray.get(ref)
                    except rx.RayTaskError as err:  # the job's own exception, as an instance of its class
                        raise err.as_instanceof_cause() from None
                    except (rx.WorkerCrashedError, rx.OutOfMemoryError) as err:
                        raise JobError(f"{_label(self.jobs[i], i)}: its Ray worker died {self._ex.retries + 1} times "
                                       f"(killed or out of memory?); the jobs that finished are kept "
                                       f"({type(err).__name__})") from err
                    except (rx.RaySystemError, rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError,
                            ConnectionError) as err:
                        raise ClusterError(f"lost the Ray cluster ({self._ex.address_text}) while running "
                                           f"{_label(self.jobs[i], i)}: {type(err).__name__}: {err}") from err
                    # numpy arrays come out of Ray's object store read-only (zero-copy); a copy gives the caller
                    # what the in-process executor gives it
                    r = copy.deepcopy(r)
                    self._out[i] = r
                    if self._on_result is not None:
                        self._on_result(i, r)
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            self.cancel()
            raise
        return [self._out[i] for i in range(len(self.jobs))]

    def cancel(self) -> None:
        import ray

        for i, ref in enumerate(self._refs):
            if i not in self._out:
                # kills the worker running it, drops a queued task; one that finished meanwhile, or a cluster that
                # is gone, leaves nothing to stop
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
        if self in self._ex._live:
            self._ex._live.remove(self)


class RayExecutor(Executor):
    """Jobs as Ray core tasks (one CPU each); see the module docstring.

    Args:
        address: None or "" = start a private Ray on this machine; "auto" = the cluster this machine belongs to
            (``ray start``); ``host:port`` = that cluster's head.
        workers: CPUs of a private Ray (default: this machine's); ignored when joining a cluster.
        retries: times a task whose worker died is run again.
        object_store_mb: object store of a private Ray.
    """

    kind = "ray"

    def __init__(self, address: str | None = None, workers: int | None = None, retries: int = 3,
                 object_store_mb: int = OBJECT_STORE_MB) -> None:
        if workers is not None and workers < 1:
            raise ValueError(f"workers={workers} is invalid: must be >= 1")
        if retries < 0:
            raise ValueError(f"retries={retries} is invalid: must be >= 0")
        try:
            import ray
        except ImportError as err:  # pragma: no cover - ray is a pinned dependency of the dev install
            raise ImportError("--executor ray needs Ray: pip install -e '.[ray]'") from err
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reporting (read by every Ray process)
        self.address = address or None
        self.retries = retries
        self._live: list[_RayBatch] = []
        self._reaper: subprocess.Popen | None = None
        if ray.is_initialized():
            raise RuntimeError("Ray is already initialised in this process: close the other RayExecutor first")
        common: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False,
                                  "namespace": "feedgym"}
        handlers = _python_handlers()
        if self.address is None:
            n = workers or os.cpu_count() or 1
            # Ray starts its workers at nice 15; a private Ray's workers are this job's own rollouts, so they run at
            # the driver's priority (else any other job on the machine starves them: measured 12 % of a core each)
            os.environ.setdefault("RAY_worker_niceness", "0")
            with _loopback_only():
                ray.init(num_cpus=n, object_store_memory=object_store_mb * 2**20, _node_ip_address="127.0.0.1",
                         **common)
            self.private = True
            self._reaper = _start_reaper()
        else:
            _check_reachable(self.address)
            try:
                ray.init(address=self.address, **common)
            except (ConnectionError, RuntimeError) as err:
                raise ClusterError(f"cannot join the Ray cluster at --ray-address {self.address}: {err} (start one "
                                   "with `ray start --head`, or run with --executor local)") from err
            self.private = False
        _restore(handlers)
        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.task = ray.remote(_call)

    @property
    def address_text(self) -> str:
        return "a private Ray on this machine" if self.address is None else f"--ray-address {self.address}"

    def start(self, fn: Callable[..., Any], jobs: Sequence[Any], *, common: Any = _NO_COMMON,
              on_result: Callable[[int, Any], None] | None = None) -> Batch:
        return _RayBatch(self, fn, jobs, common, on_result)

    def describe(self) -> str:
        return f"ray executor ({self.address_text}), {self.workers} CPU(s)"

    def close(self) -> None:
        """Cancels the tasks still running, then stops a private Ray (or disconnects from the cluster)."""
        import ray

        for b in list(self._live):
            b.cancel()
        if ray.is_initialized():
            ray.shutdown()  # a private Ray's processes end; a cluster's stay up
        if self._reaper is not None:
            self._reaper.terminate()
            self._reaper.wait()
            self._reaper = None


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """While a private Ray starts: every Ray process advertises and listens on 127.0.0.1 only.

    Ray on Linux turns a ``_node_ip_address`` of 127.0.0.1 into the host's address (a cluster node must be
    reachable) and its servers then listen on every interface; the single-machine mode it uses on macOS keeps them
    on loopback. That mode is a module constant read when the address is resolved, and an environment variable
    read by the Ray processes started now; both are set only for this start (a later join of a cluster from the
    same process must advertise the real address)."""
    from ray._private import ray_constants

    var = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_const = os.environ.get(var), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[var] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = saved_env


def _python_handlers() -> dict[int, Any]:
    """This process's Python handlers of SIGTERM and SIGINT (read in the main thread only)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: dict[int, Any]) -> None:
    """Puts back the handlers ``ray.init`` replaced: Ray's driver installs a C++ handler that dumps the stack and
    aborts on SIGTERM, so :func:`exit_on_sigterm`'s cleanup (cancel the tasks, stop the private Ray) would not
    run, nor would Ctrl-C's ``KeyboardInterrupt``."""
    for sig, h in handlers.items():
        if h is not None:
            signal.signal(sig, h)


def make_executor(kind: Literal["local", "ray"] | str = "local", address: str = "", workers: int = 0) -> Executor:
    """The executor a script's ``--executor``, ``--ray-address`` and ``--workers`` ask for (``workers`` 0 = every
    core of this machine, for a private Ray)."""
    if kind == "local":
        if address:
            raise ValueError(f"--ray-address {address} needs --executor ray")
        return LocalExecutor()
    if kind == "ray":
        if workers < 0:
            raise ValueError(f"--workers={workers} is invalid: must be >= 0 (0 = every core)")
        return RayExecutor(address or None, workers or None)
    raise ValueError(f"--executor {kind!r} is invalid: must be one of {EXECUTORS}")


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` that does not accept connections raises :class:`ClusterError` at once (``ray.init`` would
    retry for minutes); ``auto`` is checked by Ray itself (it fails at once when no cluster runs here)."""
    if address == "auto" or address.startswith(("ray://", "local")):
        return
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--ray-address {address!r} is invalid: give 'auto' or the head's host:port")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise ClusterError(f"cannot reach the Ray cluster at --ray-address {address} ({err}): is `ray start --head` "
                           "running there? (or run with --executor local)") from None


# ------------------------------------------------------------------------------------ processes of a private Ray

_REAPER = """
import os, signal, sys, time
driver = int(sys.argv[1])

def tree(root):
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    s = f.read()
            except OSError:
                continue
            kids.setdefault(int(s[s.rindex(")") + 2:].split()[1]), []).append(int(d))
    out, todo = set(), [root]
    while todo:
        for k in kids.get(todo.pop(), []):
            if k not in out and k != os.getpid():
                out.add(k)
                todo.append(k)
    return out

seen = set()
while os.getppid() == driver:
    seen = tree(driver)
    time.sleep(1.0)
for pid in seen:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
"""


def _start_reaper() -> subprocess.Popen | None:
    """A small watcher that kills the private Ray's processes if the driver dies without closing it (SIGKILL):
    Ray ends its raylet and GCS with the driver, but not their agents. Linux only (it reads /proc)."""
    if not os.path.isdir("/proc/self") or not sys.platform.startswith("linux"):
        return None
    return subprocess.Popen([sys.executable, "-c", _REAPER, str(os.getpid())], stdin=subprocess.DEVNULL,
                            start_new_session=True)


def exit_on_sigterm() -> None:
    """From now on SIGTERM ends this process and every process it started: the handler terminates the child
    processes started with ``multiprocessing`` (a learned-ranker build) and raises ``SystemExit(143)`` (128 +
    SIGTERM), so ``finally`` blocks and exit handlers run (an executor cancels its tasks and stops a private Ray,
    files are flushed). A second SIGTERM during that cleanup kills at once. Call it from a script's main thread."""

    def handler(signum: int, frame: Any) -> None:
        import multiprocessing as mp

        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for child in mp.active_children():
            child.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
