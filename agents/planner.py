"""The clairvoyant planner and the keyed rollouts that measure headroom against it.

:func:`branched_rollout` serves ``n_users`` users, each as ``K`` clones (``FeedSimulator.key_users``: the same
hidden user, the same random numbers), clone ``k`` served by ``arms[k]``. With one arm it is an ordinary
evaluation of that policy on keyed users. With several it is the **clairvoyant planner**: every ``period``
requests it looks at each user's ``K`` branches, which it is allowed to do with the hidden world (the clones
lived the same ``period`` requests under the same random numbers, so the planner sees the future each arm
leads to), commits to the best, and makes every clone a copy of it (``FeedSimulator.copy_users``); the
committed branch's requests are the user's life. A user whose life ended leaves the batch
(``FeedSimulator.retire``), so the rollout costs the users' lives rather than the longest one times the batch.
The best branch is the one with the highest chance of being in the app at the horizon, given what happened in
the period and the user's hidden state at its end:
0 if it churned, 1 if it reached the horizon, else ``exp(-h * days left)`` with ``h`` the quit hazard of the
long-term satisfaction and habit the session would leave if it ended now (``Users.fold``, ``Users.clocks``).

It is an upper bound in practice, not a proof of one: it knows the hidden state and the noise one period
ahead, but chooses greedily among ``K`` arms (a policy that looks further ahead, or mixes arms within a
period, could do better). It is named for what it is and only ever used to measure headroom.

Every rollout here keys user ``i`` by ``i`` (the world's salt, identity ``i``, generation), so a one-arm
rollout of the CEM-tuned vector and the planner's rollout serve the same users under the same noise, and
their per-user outcomes pair up. Finished users are retired: the users left stand for the population
(``FeedSimulator.retire``), the same for every policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from agents.policies import Policy
from envs.config import FeedConfig
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.types import Array

COUNTS: tuple[str, ...] = ("engagement/videos", "engagement/regrets", "creators/new_creator_impressions")


@dataclass
class Decisions:
    """The planner's commitments (``branched_rollout(record=True)``): one row per (user, period)."""

    obs: Array  # (N, D) the user's observation when the period began (what a policy would have seen)
    scores: Array  # (N, K) each arm's survival score at the period's end (the planner took the argmax)


@dataclass
class KeyedResult:
    """Per-user outcomes of one keyed rollout (``n_users`` users, in identity order)."""

    name: str
    seed: int
    retained: Array  # (U,) bool: in the app at the horizon (not churned)
    counts: dict[str, Array]  # COUNTS -> (U,) totals over the user's life
    start_obs: Array  # (U, D) the first observation of each user (to report by segment)
    arm_share: Array  # (K,) share of committed periods each arm was chosen (1.0 with one arm)
    requests: int  # user-requests simulated, all clones included
    decisions: Decisions | None = None  # the planner's commitments, with ``record=True``

    @property
    def regret_rate(self) -> float:
        return float(self.counts["engagement/regrets"].sum() / max(self.counts["engagement/videos"].sum(), 1.0))

    @property
    def new_creator_share(self) -> float:
        v = max(self.counts["engagement/videos"].sum(), 1.0)
        return float(self.counts["creators/new_creator_impressions"].sum() / v)


def survival_score(sim: FeedSimulator, horizon_days: float) -> Array:
    """(B,) chance each row is still in the app at the horizon if its session ended now and its hazard held:
    ``exp(-h (horizon - day))`` from the hidden state (the planner's look at the truth)."""
    u = sim.users
    long_sat, habit = u.fold(u.feeling())
    _, hazard = u.clocks(long_sat, habit)
    return np.exp(-hazard * np.maximum(horizon_days - u.day, 0.0))


def branched_rollout(arms: Sequence[Policy], cfg: FeedConfig, n_users: int, seed: int, period: int = 20,
                     name: str | None = None, progress: bool = False, record: bool = False) -> KeyedResult:
    """One life per user, ``len(arms)`` clones each (see the module docstring); ``period`` requests between
    the planner's commitments (ignored with one arm). ``record``: keep every commitment's observation and
    arm scores (:class:`Decisions`, what :mod:`agents.distill` learns from)."""
    k = len(arms)
    if k < 1 or n_users < 1 or period < 1:
        raise ValueError(f"branched_rollout needs >= 1 arm, user and period; got {k}, {n_users}, {period}")
    if any(a.env_overrides for a in arms):
        raise ValueError("branched_rollout serves every arm in one world: arms with env_overrides "
                         f"({[a.name for a in arms if a.env_overrides]}) cannot branch")
    b = n_users * k
    sim = FeedSimulator(cfg, b, seed=seed)
    sim.key_users(np.arange(b) // k)  # row r is clone r % K of user r // K
    obs = sim.reset()
    for a in arms:
        a.bind(sim)
    start_obs = obs[::k].copy()
    alive = np.arange(n_users)  # users whose (committed) life goes on, in batch order, K rows each
    retained = np.zeros(n_users, bool)
    totals = {c: np.zeros(n_users) for c in COUNTS}
    chosen = np.zeros(k, np.int64)
    requests = 0
    rec_obs: list[Array] = []
    rec_scores: list[Array] = []
    bar = tqdm(total=n_users, desc=name or arms[0].name, disable=not progress, leave=False)
    while alive.size:
        rows_now = alive.size * k
        arm_rows = [np.arange(j, rows_now, k) for j in range(k)]  # rows each arm serves
        if record and k > 1:
            rec_obs.append(obs[::k].copy())  # the clones of a user are copies here: one observation each
        period_counts = {c: np.zeros(rows_now) for c in COUNTS}
        ended = np.zeros(rows_now, bool)  # the clone's life ended during this period (it then serves a new user)
        churned = np.zeros(rows_now, bool)
        for _ in range(period):
            action = np.empty((rows_now, N_KNOBS), np.float32)
            for a, rows in zip(arms, arm_rows, strict=True):
                action[rows] = a.act(obs[rows])
            res = sim.step(action)
            requests += rows_now
            live = ~ended
            for c in COUNTS:
                period_counts[c] += np.where(live, res.info[c], 0.0)
            fin = res.terminated | res.truncated
            churned |= live & res.terminated
            ended |= fin
            obs = res.obs
            if k == 1 and ended.all():
                break
            if fin.any():  # a branch whose life ended mid-period idles as its next keyed user until the commit
                obs = np.where(fin[:, None], sim.reset(fin), obs)
        if k > 1:
            score = np.where(ended, np.where(churned, 0.0, 1.0), survival_score(sim, cfg.horizon_days))
            best = score.reshape(alive.size, k).argmax(axis=1)  # ties: the lowest arm
            if record:
                rec_scores.append(score.reshape(alive.size, k).astype(np.float32))
        else:
            best = np.zeros(alive.size, np.int64)
        src = np.arange(alive.size) * k + best
        for c in COUNTS:
            totals[c][alive] += period_counts[c][src]
        chosen += np.bincount(best, minlength=k)
        fin_user = ended[src]
        retained[alive[fin_user]] = ~churned[src][fin_user]
        bar.update(int(fin_user.sum()))
        if k > 1:
            sim.copy_users(np.repeat(src, k))
            obs = obs[np.repeat(src, k)]
        if fin_user.all():
            break
        if fin_user.any():  # finished users leave the batch (their K rows); the others go on
            gone = np.repeat(fin_user, k)
            sim.retire(gone)
            obs = obs[~gone]
            alive = alive[~fin_user]
    bar.close()
    dec = Decisions(np.concatenate(rec_obs), np.concatenate(rec_scores)) if rec_scores else None
    return KeyedResult(name or arms[0].name, seed, retained, totals, start_obs, chosen / max(chosen.sum(), 1),
                       requests, dec)


def blind_key(key: Array, period: int, sample: int) -> Array:
    """A look-ahead clone's noise key: another user's random numbers for the same hidden user, different for every
    period and sample, never the real key (``FeedSimulator._noise`` is keyed by ``users.key``)."""
    k = key.astype(np.uint64)
    mixed = (k * np.uint64(2654435761) + np.uint64(0x9E3779B9) * np.uint64(period * 64 + sample + 1)) % np.uint64(2**32)
    return np.where(mixed == k, mixed ^ np.uint64(1), mixed).astype(np.uint32)


def blind_planner_rollout(arms: Sequence[Policy], cfg: FeedConfig, n_users: int, seed: int, period: int = 20,
                          samples: int = 1, name: str | None = None, progress: bool = False) -> KeyedResult:
    """The planner **without foresight**: it knows the hidden state, not the noise to come. Every ``period``
    requests each user's ``len(arms) * samples`` look-ahead clones live the period under their arm with random
    numbers of their own (:func:`blind_key`) in a world that stands still (``FeedSimulator.frozen_world``); the
    planner takes the arm with the best mean survival score (:func:`survival_score`), and the user's real row then
    lives the period under it, with the user's own random numbers, while the clones wait (the simulator's masked
    step). What it gains over CEM-tuned is the value of knowing the hidden state one period ahead; what the
    clairvoyant planner (:func:`branched_rollout`) gains beyond it is the value of foreseeing the noise, which no
    policy can have. Users are keyed as in :func:`branched_rollout`, so outcomes pair with its one-arm rollouts."""
    k = len(arms)
    if k < 2 or n_users < 1 or period < 1 or samples < 1:
        raise ValueError(f"blind_planner_rollout needs >= 2 arms and >= 1 user, period and sample; got {k}, "
                         f"{n_users}, {period}, {samples}")
    if any(a.env_overrides for a in arms):
        raise ValueError("blind_planner_rollout serves every arm in one world: arms with env_overrides "
                         f"({[a.name for a in arms if a.env_overrides]}) cannot branch")
    r = k * samples + 1  # rows per user: the clones (arm j % k, sample j // k), then the real row
    sim = FeedSimulator(cfg, n_users * r, seed=seed)
    sim.key_users(np.arange(n_users * r) // r)
    obs = sim.reset()
    for a in arms:
        a.bind(sim)
    start_obs = obs[r - 1::r].copy()
    alive = np.arange(n_users)
    retained = np.zeros(n_users, bool)
    totals = {c: np.zeros(n_users) for c in COUNTS}
    chosen = np.zeros(k, np.int64)
    requests, n_period = 0, 0
    bar = tqdm(total=n_users, desc=name or "blind planner", disable=not progress, leave=False)
    while alive.size:
        rows_now = alive.size * r
        offset = np.arange(rows_now) % r
        real = offset == r - 1
        clone = ~real
        # the look-ahead: the clones, with noise of their own, in a world that stands still
        sample = offset // k
        sim.users.key = np.where(clone, blind_key(sim.users.key, n_period, 0) ^ sample.astype(np.uint32),
                                 sim.users.key).astype(np.uint32)
        ended = np.zeros(rows_now, bool)
        churned = np.zeros(rows_now, bool)
        with sim.frozen_world():
            for _ in range(period):
                action = np.zeros((rows_now, N_KNOBS), np.float32)
                for j, a in enumerate(arms):
                    rows = np.flatnonzero(clone & (offset % k == j))
                    action[rows] = a.act(obs[rows])
                res = sim.step(action, clone & ~ended)
                requests += int((clone & ~ended).sum())
                churned |= clone & ~ended & res.terminated
                ended |= clone & (res.terminated | res.truncated)
                obs = np.where((clone & ~ended)[:, None], res.obs, obs)
                if ended[clone].all():
                    break
        score = np.where(ended, np.where(churned, 0.0, 1.0), survival_score(sim, cfg.horizon_days))
        best = score.reshape(alive.size, r)[:, :-1].reshape(alive.size, samples, k).mean(axis=1).argmax(axis=1)
        chosen += np.bincount(best, minlength=k)
        # the real life: each user's real row under the chosen arm, with the user's own random numbers
        # (a life that ends mid-period idles as its next keyed user until the commit, as in branched_rollout, so
        # the world sees the same traffic as under a one-arm rollout)
        real_rows = np.flatnonzero(real)
        done = np.zeros(rows_now, bool)
        for _ in range(period):
            action = np.zeros((rows_now, N_KNOBS), np.float32)
            for j, a in enumerate(arms):
                rows = real_rows[best == j]
                if rows.size:
                    action[rows] = a.act(obs[rows])
            res = sim.step(action, real)
            requests += alive.size
            live = real & ~done
            u = alive[np.flatnonzero(live[real])]
            for c in COUNTS:
                totals[c][u] += res.info[c][live]
            fin = real & (res.terminated | res.truncated)
            first = fin & ~done
            retained[alive[np.flatnonzero(first[real])]] = ~res.terminated[first]
            done |= fin
            obs = np.where(real[:, None], res.obs, obs)
            if done[real].all():
                break
            if fin.any():
                obs = np.where(fin[:, None], sim.reset(fin), obs)
        n_period += 1
        fin_user = done[real]
        bar.update(int(fin_user.sum()))
        if fin_user.all():
            break
        src = real_rows.repeat(r)  # every row of a user becomes a copy of its real row (keys included)
        sim.copy_users(src)
        obs = obs[src]
        if fin_user.any():
            gone = np.repeat(fin_user, r)
            sim.retire(gone)
            obs = obs[~gone]
            alive = alive[~fin_user]
    bar.close()
    return KeyedResult(name or "blind_planner", seed, retained, totals, start_obs, chosen / max(chosen.sum(), 1),
                       requests)

