"""Helpers shared by the tests: env ids, seeded action sequences, a fake response model and a sink that keeps
what it was given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.sinks import NoopSink
from envs.simulator import FeedSimulator
from envs.users import SIGNALS
from rankers.config import N_KNOBS

CONTINUOUS_ID = "feedgym/ForYouFeed-v0"
DISCRETE_ID = "feedgym/ForYouFeedDiscrete-v0"
ENV_IDS = (CONTINUOUS_ID, DISCRETE_ID)


def knob_actions(n_steps: int, n_users: int, seed: int = 123) -> np.ndarray:
    """(T, B, A) float32 actions in [-1, 1]; every third step is the zero (seed) action."""
    a = np.random.default_rng(seed).uniform(-1.0, 1.0, (n_steps, n_users, N_KNOBS)).astype(np.float32)
    a[::3] = 0.0
    return a


def install_fake_world(monkeypatch: pytest.MonkeyPatch, sim: FeedSimulator, *, left: Any = False,
                       gap: Any = 1.0, feel: float = 0.0, watch_s: float = 30.0) -> dict[str, list]:
    """Replaces ``sim.users.respond`` and ``sim.users.end_session`` with deterministic fakes.

    Every slot of every slate is shown and watched for ``watch_s`` seconds, nothing else happens;
    users leave after the slate where ``left`` (bool or (B,) bool); a session that ends returns
    after ``gap`` days ((B,) or scalar, ``inf`` = quits). Returns the calls' arguments.
    """
    b = sim.n_users
    calls: dict[str, list] = {"respond": [], "end_session": []}

    def respond(item, ad, corpus, break_prompt, rand, normal):
        calls["respond"].append(item.copy())
        s = item.shape[1]
        out = {k: np.zeros((b, s), np.float32) for k in SIGNALS}
        out["watch_s"][:] = watch_s
        out["watch_frac"][:] = 0.5
        out["shown"] = np.ones((b, s), bool)
        out["left"] = np.broadcast_to(np.asarray(left, bool), (b,)).copy()
        out["took_break"] = np.zeros(b, bool)
        out["prompted"] = np.zeros(b, bool)
        return out

    def end_session(mask, took_break, rand, over_days=np.inf):
        calls["end_session"].append(mask.copy())
        g = np.broadcast_to(np.asarray(gap, np.float32), (b,)).copy()
        return g, np.full(b, feel, np.float32), (g > over_days).astype(np.float32)

    monkeypatch.setattr(sim.users, "respond", respond)
    monkeypatch.setattr(sim.users, "end_session", end_session)
    return calls


class CaptureSink(NoopSink):
    """A metrics sink that keeps every ``log`` call's metrics and step, and whether it was finished."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []
        self.finished = False

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((dict(metrics), step))

    def finish(self) -> None:
        self.finished = True


def descendants(pid: int) -> set[int]:
    """Pids of every process below ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.add(k)
            todo.append(k)
    return out


def process_state(pid: int) -> str | None:
    """The process state letter of ``pid`` (``Z`` = exited, not reaped yet), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def alive(pid: int) -> bool:
    """``pid`` is a running process (not gone, not a zombie)."""
    return process_state(pid) not in (None, "Z")

