"""Per-session decisions: one step of the env is one session of each user (a semi-MDP over sessions).

With ``decision="session"`` (:class:`envs.feed_env.FeedEnv`, :class:`envs.feed_env.FeedVectorEnv`,
:class:`envs.sb3.SB3FeedVecEnv`) the agent chooses the knobs when a user's session starts and they are held
for every request of that session. :class:`SessionSteps` wraps a simulator (``FeedSimulator`` or
``WorldMix``): its :meth:`SessionSteps.step` serves requests under the held knobs to the users whose session
goes on (the simulator's masked step) until every user's session has ended, and returns

- the observation at each user's next session start (or at the end of their episode),
- the session's reward: the sum of its requests' rewards (``churn_expected``, ``retention`` and
  ``return_time`` are non-zero only at a session's end, so they are the same reward per session),
- ``terminated`` / ``truncated`` as the request that ended it,
- ``info``: each per-request metric summed over the session's requests (a mean is the sum over
  ``info["session/requests"]``; ``retention/day`` is the user's day at the session's end), so
  ``retention/elapsed_days`` is the days from this session's start to the next's, which per-day
  discounting (``agents.ppo.PPOParams.gamma_per_day``) reads.

Users wait while others finish their sessions, so the world's clock runs on. A user's random numbers are
keyed by their own requests and sessions (``FeedSimulator._noise``): waiting changes none of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.simulator import STEP_METRICS, FeedSimulator, StepResult
from envs.world_mix import WorldMix, make_simulator
from rankers.knobs import validate_action
from rankers.types import Array

DECISIONS: tuple[str, ...] = ("request", "session")
"""The envs' decision granularities: knobs chosen at every request, or when a session starts and held."""

#: Metrics that are a state at the session's end rather than a count to sum over its requests.
LAST_METRICS: tuple[str, ...] = ("retention/day",)


def check_decision(decision: Any) -> str:
    if decision not in DECISIONS:
        raise ValueError(f"decision={decision!r} is invalid: choose from {DECISIONS} (per request, or knobs chosen "
                         "when a session starts and held for its requests)")
    return str(decision)


class SessionSteps:
    """A simulator whose :meth:`step` is one session of every user (see the module docstring). Everything
    else (``reset``, ``seed``, ``layout``, ``n_users``, ``copy_users``, ...) is the wrapped simulator's."""

    def __init__(self, sim: FeedSimulator | WorldMix) -> None:
        self.sim = sim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sim, name)

    def step(self, action: Array) -> StepResult:
        """Serves ``action`` (B, A) to each user for the whole of their current session."""
        b = self.sim.n_users
        a = validate_action(action, b)
        active = np.ones(b, bool)
        obs = np.zeros((b, self.sim.layout.dim), np.float32)
        reward = np.zeros(b, np.float32)
        terminated, truncated = np.zeros(b, bool), np.zeros(b, bool)
        info = {k: np.zeros(b, np.float32) for k in STEP_METRICS}
        requests = np.zeros(b, np.float32)
        while active.any():
            res = self.sim.step(a, active)
            reward += res.reward
            requests += active
            for k in STEP_METRICS:
                if k in LAST_METRICS:
                    info[k] = np.where(active, res.info[k], info[k])
                else:
                    info[k] += res.info[k]
            done = active & ((res.info["retention/session_end"] > 0) | res.terminated | res.truncated)
            obs[done] = res.obs[done]
            terminated |= res.terminated & active
            # a world whose life ended truncates its users, also those whose session had already ended
            truncated |= res.truncated & ~terminated
            active &= ~done
        info["session/requests"] = requests
        return StepResult(obs, reward, terminated, truncated & ~terminated, info)


def env_simulator(cfg: Any, n_users: int, seed: int | None, worlds: int, world_steps: int,
                  decision: str) -> FeedSimulator | WorldMix | SessionSteps:
    """The envs' simulator: :func:`envs.world_mix.make_simulator`, stepped a session at a time with
    ``decision="session"``."""
    sim = make_simulator(cfg, n_users, seed, worlds, world_steps)
    return SessionSteps(sim) if check_decision(decision) == "session" else sim


def metric_keys(decision: str) -> tuple[str, ...]:
    """The per-step metrics the envs put in ``info`` under ``decision``."""
    return STEP_METRICS + (("session/requests",) if decision == "session" else ())
