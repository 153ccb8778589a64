"""Training on many worlds: B users spread over K simulated worlds, each rebuilt from a fresh seed every
``world_steps`` steps.

A world (``FeedSimulator(cfg, n, seed)``) is one draw of the corpus, its creators and its trajectory; an
evaluation seed is one world. A policy or a static knob vector tuned on a single world learns that
world, and what it learned need not carry to another (docs/point7.md: the CEM vector tuned on one
world gained +8.9 pp on one evaluation world and lost 6.3 pp on another). :class:`WorldMix` answers
the simulator's interface (``reset(mask)``, ``step(action)``, ``seed``, ``layout``, ``n_users``) over
K simulators with their own seeds, so the training env, CEM and data collection see many worlds:

- the users are split into K contiguous groups, one world each;
- with ``world_steps > 0`` a world ends after that many steps: all its users' episodes are truncated
  (``truncated=True``, as a time limit) and the next ``reset`` of those users rebuilds the world from
  its next seed. The K worlds' first lives are staggered (world k's lasts ``world_steps * (k + 1) / K``
  steps), so the worlds do not all end on the same step and a batch always mixes world ages, as an
  evaluation's world runs from its first day.

World k's g-th seed is :func:`world_seed` ``(seed, k, g)``; world 0's first is ``seed`` itself, so
``WorldMix(cfg, n, seed)`` (K = 1, no rebuilds) gives the observations and rewards of
``FeedSimulator(cfg, n, seed)`` (its ``info`` carries the per-step metrics and ``world``, not the slates;
:func:`make_simulator` returns the plain simulator in that case). A resumed training run rebuilds its
worlds from generation 0.
"""

from __future__ import annotations

from typing import Any, overload

import numpy as np

from envs.config import FeedConfig
from envs.simulator import STEP_METRICS, FeedSimulator, StepResult, check_rows
from rankers.types import Array


def world_sizes(n_users: int, worlds: int) -> list[int]:
    """Users of each of ``worlds`` contiguous groups of ``n_users`` (as even as possible, larger first)."""
    return [len(a) for a in np.array_split(np.arange(n_users), worlds)]


@overload
def world_seed(seed: int, world: int, generation: int) -> int: ...
@overload
def world_seed(seed: None, world: int, generation: int) -> None: ...
def world_seed(seed: int | None, world: int, generation: int) -> int | None:
    """The seed of world ``world``'s ``generation``-th life in a mix built from ``seed``: ``seed`` itself for
    (0, 0), else 32 bits drawn from ``SeedSequence([seed, world, generation])`` (``None`` stays ``None``:
    fresh entropy). The evaluation seeds are small integers; a derived seed equals one with probability
    ~1e-9 per world."""
    if seed is None:
        return None
    if world == 0 and generation == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(world), int(generation)]).generate_state(1)[0])


class WorldLife:
    """World ``world`` of a mix of ``worlds`` built from ``mix_seed``: its simulator of ``n_users`` rows and its
    lives. Its first life lasts ``world_steps * (world + 1) / worlds`` steps, the next ones ``world_steps``
    (0 = forever); the step that ends a life truncates every episode in it, and the next reset that reaches its
    users rebuilds it from its next seed (:func:`world_seed`) with all of them new. :class:`WorldMix` holds one
    per world; a CEM job steps one alone (``agents.cem``)."""

    def __init__(self, cfg: FeedConfig, n_users: int, mix_seed: int | None, world: int, worlds: int,
                 world_steps: int) -> None:
        self.mix_seed, self.world, self.worlds, self.world_steps = mix_seed, world, worlds, world_steps
        self.generation = 0
        """Lives this world has had before the current one."""
        self.ended = False
        """The current life ended on the last step; the world waits for a reset of its users to be rebuilt."""
        self.sim = FeedSimulator(cfg, n_users, seed=world_seed(mix_seed, world, 0))

    def lifetime(self) -> int:
        """Steps the current life lasts (0 = forever)."""
        if self.world_steps == 0:
            return 0
        if self.generation == 0:
            return max(1, self.world_steps * (self.world + 1) // self.worlds)
        return self.world_steps

    def reset(self, mask: Array) -> Array:
        """Starts new users where ``mask``; a world whose life ended is rebuilt first when the mask reaches any
        of its users, and then all its users start anew (rows outside the mask were truncated with it and their
        callers reset them later, the gymnasium vector env a step behind; nothing is lost)."""
        if self.ended and mask.any():
            self.generation += 1
            self.sim.seed(world_seed(self.mix_seed, self.world, self.generation))  # its step count starts at 0
            self.ended = False
            mask = np.ones_like(mask)
        return self.sim.reset(mask)

    def step(self, action: Array, active: Array | None = None) -> StepResult:
        """The simulator's step; on the step that ends the world's life every episode that did not terminate is
        truncated. A world that ended and was not reset yet is stepped as it is."""
        res = self.sim.step(action, active)
        life = self.lifetime()
        if life and self.sim.total_steps >= life:
            res.truncated = ~res.terminated
            self.ended = True
        return res


class WorldMix:
    """``n_users`` users over ``worlds`` simulators (see the module docstring).

    Args:
        cfg: the world config (every world uses it; only the seed differs).
        n_users: B, users stepped together (split as evenly as possible; B >= K).
        seed: the mix's seed (:func:`world_seed`).
        worlds: K, worlds at once.
        world_steps: steps a world lives before it is rebuilt from its next seed (0 = never).
    """

    def __init__(self, cfg: FeedConfig, n_users: int, seed: int | None = None, worlds: int = 1,
                 world_steps: int = 0) -> None:
        if not isinstance(worlds, (int, np.integer)) or worlds < 1:
            raise ValueError(f"worlds={worlds!r} is invalid: must be an int >= 1")
        if not isinstance(n_users, (int, np.integer)) or n_users < worlds:
            raise ValueError(f"n_users={n_users!r} is invalid: must be an int >= worlds ({worlds})")
        if not isinstance(world_steps, (int, np.integer)) or world_steps < 0:
            raise ValueError(f"world_steps={world_steps!r} is invalid: must be an int >= 0 (0 = never rebuilt)")
        self.cfg = cfg
        self.worlds = int(worlds)
        self.world_steps = int(world_steps)
        self.n_users0 = int(n_users)
        self._sizes = world_sizes(self.n_users0, self.worlds)
        self.bounds = np.r_[0, np.cumsum(self._sizes)]
        """World k serves rows ``bounds[k]:bounds[k + 1]``."""
        self.world_of = np.repeat(np.arange(self.worlds), self._sizes)
        """(B,) int64 the world index of each row."""
        self.user_identity: Array | None = None
        self._build(seed)
        self.layout = self.sims[0].layout

    def _build(self, seed: int | None) -> None:
        self.mix_seed = seed
        self.lives = [WorldLife(self.cfg, n, seed, k, self.worlds, self.world_steps) for k, n in enumerate(self._sizes)]
        self._key_worlds()

    @property
    def sims(self) -> list[FeedSimulator]:
        return [w.sim for w in self.lives]

    @property
    def generation(self) -> list[int]:
        """Each world's lives before its current one."""
        return [w.generation for w in self.lives]

    @property
    def ended(self) -> Array:
        """(K,) bool: worlds whose life ended on the last step and wait for their users' reset to be rebuilt."""
        return np.array([w.ended for w in self.lives], bool)

    @property
    def n_users(self) -> int:
        return self.n_users0

    @property
    def world_seeds(self) -> list[int | None]:
        """The seed each world's current life was built from."""
        return [s.built_seed for s in self.sims]

    @property
    def latency(self) -> dict[str, float]:
        return {"total": float(sum(s.latency["total"] for s in self.sims))}

    def key_users(self, identity: Array | None) -> None:
        """``FeedSimulator.key_users`` for every world (``identity`` (B,) over the mix's rows; kept when a world
        is rebuilt)."""
        self.user_identity = check_rows(identity, self.n_users0, "key_users", "non-negative integer identities")
        self._key_worlds()

    def _key_worlds(self) -> None:
        ident = self.user_identity
        for k, sim in enumerate(self.sims):
            sim.key_users(None if ident is None else ident[self.bounds[k]:self.bounds[k + 1]])

    def copy_users(self, src: Array) -> None:
        """``FeedSimulator.copy_users`` over the mix's rows: row r becomes a copy of row ``src[r]`` of the same
        world."""
        b = self.n_users0
        src = check_rows(src, b, "copy_users", f"integer rows in [0, {b})", high=b)
        if (self.world_of[src] != self.world_of).any():
            raise ValueError("copy_users copies users within their world only; some rows of src are in another world")
        for k, sim in enumerate(self.sims):
            sim.copy_users(src[self.bounds[k]:self.bounds[k + 1]] - self.bounds[k])
        if self.user_identity is not None:
            self.user_identity = self.user_identity[src]

    def lifetime(self, world: int) -> int:
        """Steps world ``world``'s current life lasts (0 = forever)."""
        return self.lives[world].lifetime()

    def seed(self, seed: int | None) -> None:
        """Rebuilds every world from ``seed`` (all users must be reset)."""
        self._build(seed)

    def reset(self, mask: Array | None = None, seed: int | None = None) -> Array:
        """Starts new users where ``mask`` (all if None). A world that ended is rebuilt when the mask reaches
        any of its users, and all its users start anew (an ended world the mask misses waits). With ``seed``,
        rebuilds every world first."""
        if seed is not None:
            self._build(seed)
        mask = np.ones(self.n_users0, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != (self.n_users0,):
            raise ValueError(f"reset mask has shape {mask.shape}, expected ({self.n_users0},)")
        parts = [w.reset(mask[self.bounds[k]:self.bounds[k + 1]]) for k, w in enumerate(self.lives)]
        return np.concatenate(parts)

    def step(self, action: Array, active: Array | None = None) -> StepResult:
        """Steps every world with its users' rows of ``action`` (B, A); a world whose life ends on this
        step truncates every episode in it that did not terminate. A world that ended and was not reset
        yet is stepped as it is (the gymnasium vector env steps finished users once before resetting
        them, and discards what they do). ``active`` (B,) bool steps only those users
        (:meth:`envs.simulator.FeedSimulator.step`)."""
        a = np.asarray(action)
        if a.ndim < 1 or a.shape[0] != self.n_users0:
            raise ValueError(f"action has shape {a.shape}, expected ({self.n_users0}, A)")
        if active is not None and np.shape(active) != (self.n_users0,):
            raise ValueError(f"active has shape {np.shape(active)}, expected ({self.n_users0},)")
        results = []
        for k, w in enumerate(self.lives):
            rows = slice(self.bounds[k], self.bounds[k + 1])
            results.append(w.step(a[rows], None if active is None else np.asarray(active)[rows]))
        info: dict[str, Any] = {k: np.concatenate([r.info[k] for r in results]) for k in STEP_METRICS}
        info["world"] = self.world_of
        return StepResult(np.concatenate([r.obs for r in results]), np.concatenate([r.reward for r in results]),
                          np.concatenate([r.terminated for r in results]),
                          np.concatenate([r.truncated for r in results]), info)


def make_simulator(cfg: FeedConfig, n_users: int, seed: int | None = None, worlds: int = 1,
                   world_steps: int = 0) -> FeedSimulator | WorldMix:
    """A :class:`WorldMix`, or the plain :class:`FeedSimulator` it equals when there is one world that never
    ends (so ``.users``, ``.pipeline`` and the rest stay reachable)."""
    if worlds == 1 and world_steps == 0:
        return FeedSimulator(cfg, n_users, seed=seed)
    return WorldMix(cfg, n_users, seed, worlds, world_steps)
