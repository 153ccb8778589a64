"""The batched feed simulator: B users, one feed request each per step. All dynamics live here;
the gymnasium and stable-baselines3 environments are thin adapters around it.

It never resets on its own: ``reset(mask)`` starts new users where asked, ``step(action)``
advances every user by one request and reports ``terminated`` (churn) and ``truncated`` (horizon).
``retire(mask)`` drops users whose episodes ended for good (an evaluation that does not restart
them): the batch shrinks, later steps serve only the rest, and a churned user no longer watches
videos or moves the world's counters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, overload

import numba
import numpy as np

from envs.config import FeedConfig
from envs.learned import served_models
from envs.observation import ObservationLayout
from envs.users import Users
from envs.world import Corpus
from rankers.config import N_KNOBS
from rankers.hashing import hash_absorb, hash_normal, hash_normal_of, hash_uniform_of
from rankers.knobs import Knobs, knobs_from_action, validate_action
from rankers.pipeline import Pipeline
from rankers.sourcing import SRC_TRENDING, regional_prior, regional_priors
from rankers.types import Array, Feedback, take_rows
from rankers.user_model import LONG_RATE_NAMES, UserView

#: Per-step metric names in ``info`` (each a (B,) float32 array). See README's glossary.
STEP_METRICS: tuple[str, ...] = (
    "engagement/videos", "engagement/watch_s", "engagement/completes", "engagement/likes", "engagement/shares",
    "engagement/comments", "engagement/follows", "engagement/skips", "engagement/regrets",
    "engagement/not_interested", "engagement/harmful", "slate/ads", "slate/topic_entropy", "slate/intra_list_distance",
    "slate/explore_shown", "slate/rule_relaxed", "creators/new_creator_impressions", "creators/new_creator_follows",
    "retention/session_end", "retention/returned", "retention/churned", "retention/gap_days",
    "retention/session_videos", "retention/session_minutes", "retention/session_feeling", "retention/break_prompted",
    "retention/break_taken", "retention/day", "retention/elapsed_days", "integrity/boosted_impressions",
    "integrity/trending_impressions", "integrity/boosted_trending_impressions",
)


HISTORY_VIDEOS = 50.0
"""Engaged videos an established user's logged history holds when the episode starts (the system's view)."""
LOGGED_RATES: dict[str, float] = {"like": 0.073, "share": 0.01}
"""Population like and share rates per video of the logged (weighted-sum) policy: the calibration probe's 7.3 %
likes and the ~1 % shares of the targets (docs/simulator.md), the base of established users' logged rates."""


@dataclass
class StepResult:
    obs: Array  # (B, D) float32
    reward: Array  # (B,) float32
    terminated: Array  # (B,) bool churn
    truncated: Array  # (B,) bool horizon
    info: dict[str, Any]


def streams(seed: int | None) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """The world's, the users' and the noise salt's generators of a simulator built from ``seed``."""
    # spawn(3) gives the same first three children as v1's spawn(6): the world and users are unchanged
    world, users, noise = np.random.SeedSequence(seed).spawn(3)
    return np.random.default_rng(world), np.random.default_rng(users), np.random.default_rng(noise)


def world_corpus(cfg: FeedConfig, seed: int) -> Corpus:
    """The corpus a simulator built from ``seed`` starts with, without building the rest (users, pipeline,
    index): on ``large`` the pipeline's index alone takes minutes."""
    return Corpus(cfg, streams(seed)[0])


@overload
def check_rows(rows: Array, n: int, what: str, expected: str, high: int | None = None) -> Array: ...
@overload
def check_rows(rows: None, n: int, what: str, expected: str, high: int | None = None) -> None: ...
def check_rows(rows: Array | None, n: int, what: str, expected: str, high: int | None = None) -> Array | None:
    """``rows`` as an (n,) int64 copy, or a ValueError naming ``what`` when it is not (n,) integers in
    [0, ``high``) (None passes through)."""
    if rows is None:
        return None
    a = np.asarray(rows)
    if (a.shape != (n,) or a.dtype.kind not in "iu" or (a < 0).any()
            or (high is not None and (a >= high).any())):
        raise ValueError(f"{what} needs ({n},) {expected}; got shape {a.shape}, dtype {a.dtype}")
    return a.astype(np.int64)


@numba.njit(cache=True, nogil=True)
def _request_noise(salt: int, key: Array, steps: Array, n_sessions: Array, r_resp: Array, n_resp: Array,
                   r_sess: Array, ts_noise: Array) -> None:
    """:meth:`FeedSimulator._noise`'s four arrays in one compiled pass, bit for bit those of
    ``rankers.hashing`` (integer hashing, then the same float32 operations; ``tests/test_speed.py``):
    ``r_resp`` (B, S, 9) = ``hash_uniform(salt, 1, key, step, position, j)``, ``n_resp`` (B, S) =
    ``hash_normal(salt, 2, key, step, position)``, ``r_sess`` (B, 4) = ``hash_uniform(salt, 3, key, session, j)``
    (as float64), ``ts_noise`` (B, P) = ``hash_normal(salt, 4, key, step, j)``."""
    h_salt = hash_absorb(0x27D4EB2F, np.int64(salt), 0)
    h_resp, h_norm = hash_absorb(h_salt, 1, 1), hash_absorb(h_salt, 2, 1)
    h_sess, h_ts = hash_absorb(h_salt, 3, 1), hash_absorb(h_salt, 4, 1)
    for u in range(key.shape[0]):
        k, st = np.int64(key[u]), np.int64(steps[u])
        a = hash_absorb(hash_absorb(h_resp, k, 2), st, 3)
        for j in range(r_resp.shape[1]):
            aj = hash_absorb(a, j, 4)
            for q in range(r_resp.shape[2]):
                r_resp[u, j, q] = hash_uniform_of(hash_absorb(aj, q, 5))
        a = hash_absorb(hash_absorb(h_norm, k, 2), st, 3)
        for j in range(n_resp.shape[1]):
            n_resp[u, j] = hash_normal_of(hash_absorb(a, j, 4))
        a = hash_absorb(hash_absorb(h_sess, k, 2), np.int64(n_sessions[u]), 3)
        for j in range(r_sess.shape[1]):
            r_sess[u, j] = np.float64(hash_uniform_of(hash_absorb(a, j, 4)))
        a = hash_absorb(hash_absorb(h_ts, k, 2), st, 3)
        for j in range(ts_noise.shape[1]):
            ts_noise[u, j] = hash_normal_of(hash_absorb(a, j, 4))


class FeedSimulator:
    """Holds the world, B users, the system's view of them and the pipeline."""

    def __init__(self, cfg: FeedConfig, n_users: int, seed: int | None = None,
                 models: dict[str, Any] | None = None) -> None:
        """``models``: the trained models ``cfg`` serves (``{kind: torch module}``), if it serves any; default
        those provided to this process for its world (:func:`envs.learned.served_models`, which raises
        :class:`envs.learned.MissingModelsError` saying how to provide them)."""
        if not isinstance(n_users, (int, np.integer)) or n_users < 1:
            raise ValueError(f"n_users={n_users!r} is invalid: must be an int >= 1")
        self.cfg = cfg
        self.n_users0 = int(n_users)
        """Users the simulator was built with (:meth:`retire` shrinks ``n_users``, not this)."""
        self.layout = ObservationLayout(cfg)
        self.models = models
        """The trained models given to the constructor (None: those provided for the world, :meth:`_build`)."""
        self.user_identity: Array | None = None
        """(B,) per built row, the identity its new users are drawn from (:meth:`key_users`; None = the batch's
        stream)."""
        self._build(seed)

    # ------------------------------------------------------------------ construction / seeding
    def _build(self, seed: int | None) -> None:
        self.built_seed = seed
        """The seed the world and streams were last built from (None = fresh OS entropy)."""
        self.rng_world, self.rng_users, rng_noise = streams(seed)
        self.noise_salt = int(rng_noise.integers(2**32, dtype=np.uint64))
        """Keys this world's per-user random numbers (:meth:`_noise`)."""
        self.uid = np.arange(self.n_users0)
        """(B,) the built batch's row of each current user (``arange`` until :meth:`retire`)."""
        self.user_generation = np.zeros(self.n_users0, np.int64)
        """(B,) keyed users each built row has started since the world was built (:meth:`key_users`; a copy takes
        its source's, :meth:`copy_users`)."""
        cfg, b = self.cfg, self.n_users
        self.corpus = Corpus(cfg, self.rng_world)
        self.users = Users(cfg, b)
        c = cfg.corpus
        self.view = UserView(b, c.emb_dim, c.n_topics, seen_memory=cfg.pipeline.seen_memory,
                             n_creators=self.corpus.catalog.n_creators)
        models = served_models(cfg, self.models)  # trained models: given, never built here
        self.pipeline = Pipeline(cfg.pipeline, self.corpus.catalog, self.view, self._truth, models=models)
        self.world_day = 0.0
        self.steps = np.zeros(b, np.int64)
        self.new_session = np.ones(b, bool)
        self.total_steps = 0
        self.frozen = False
        """Inside :meth:`frozen_world`: steps serve the users but leave the world as it is."""
        self.latency = {"total": 0.0}
        self._prior = self.corpus.topic_centre.mean(axis=0)
        self._priors_key: tuple[float, int] | None = None  # the catalog state _priors was computed for
        self._priors = np.zeros(0, np.float32)

    @property
    def n_users(self) -> int:
        """Users in the batch now (``n_users0`` until :meth:`retire`)."""
        return int(self.uid.size)

    def _truth(self, users: Array, items: Array) -> Array:
        return self.users.expected_heads(users, items, self.corpus)

    def seed(self, seed: int | None) -> None:
        """Rebuilds the world and every random stream from ``seed`` (all users must be reset)."""
        self._build(seed)

    def key_users(self, identity: Array | None) -> None:
        """From the next :meth:`reset` on, the user started in row r is drawn from (this world, ``identity[r]``,
        the number of keyed users row r has started since the world was built) instead of the batch's stream, so
        rows with the same identity start the same sequence of users, whenever each of them is reset: clones,
        with the same hidden state and the same random numbers (:meth:`_noise` is keyed by the user). Under the
        same actions clones live the same lives; under different ones they differ only by what the actions
        did. CEM compares its candidates on clones (``agents.cem``). ``None`` returns to the batch's stream.
        Kept when the world is rebuilt (:meth:`seed`)."""
        self.user_identity = check_rows(identity, self.n_users0, "key_users", "non-negative integer identities")

    def copy_users(self, src: Array) -> None:
        """Row r becomes a copy of row ``src[r]`` (B,): the hidden user, the system's view of them and their
        pipeline state, their place in their life and (with :meth:`key_users`) the users they start next.
        From here on, copies of one user live the same life under the same actions and differ only by what
        different actions do: CEM branches its candidates from one state this way (``agents.cem``). Rows are
        those of the batch now (after :meth:`retire`, the users left)."""
        b = self.n_users
        src = check_rows(src, b, "copy_users", f"integer rows in [0, {b})", high=b)
        uid = self.uid  # a row keeps its place in the built batch
        for obj, names in self._row_fields():
            take_rows(obj, names, src)
        self.uid = uid
        self.pipeline.rows_changed()

    def _new_users(self, mask: Array) -> tuple[dict[str, Array] | None, Array]:
        """New users for ``mask``: their attributes (``Users.draw``, B rows; None when ``mask`` is empty and
        users are keyed) and the (B, d) noise of the system's first view of their interests. From the batch's
        stream, drawn for all B whoever is reset (the stream advances the same way), or for each masked row
        from its identity and generation (:meth:`key_users`; clones share one draw)."""
        u, b, d = self.users, self.n_users, self.users.long.shape[1]
        if self.user_identity is None:
            return u.draw(b, self.rng_users, self.corpus), self.rng_users.standard_normal((b, d))
        rows = np.flatnonzero(mask)
        if rows.size == 0:
            return None, np.zeros((b, d))
        keys, inv = np.unique(np.stack([self.user_identity[rows], self.user_generation[rows]], axis=1), axis=0,
                              return_inverse=True)
        self.user_generation[rows] += 1
        rngs = [np.random.default_rng([self.noise_salt, 5, int(i), int(g)]) for i, g in keys]
        draws = [(u.draw(1, rng, self.corpus), rng.standard_normal((1, d))) for rng in rngs]
        new = {}
        for name in draws[0][0]:
            col = np.concatenate([dr[0][name] for dr in draws])
            new[name] = np.zeros((b, *col.shape[1:]), col.dtype)
            new[name][rows] = col[inv.reshape(-1)]
        noise = np.zeros((b, d))
        noise[rows] = np.concatenate([dr[1] for dr in draws])[inv.reshape(-1)]
        return new, noise

    # ------------------------------------------------------------------ lifecycle
    def reset(self, mask: Array | None = None, seed: int | None = None) -> Array:
        """Starts new users where ``mask`` (all if None). With ``seed``, rebuilds everything first."""
        if seed is not None:
            self._build(seed)
        b = self.n_users
        if b != self.n_users0 and self.user_identity is None:
            raise ValueError(f"reset after retire: {self.n_users0 - b} of {self.n_users0} users were retired; "
                             "reset with a seed rebuilds the full batch (keyed users, key_users, can be reset)")
        mask = np.ones(b, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != (b,):
            raise ValueError(f"reset mask has shape {mask.shape}, expected ({b},)")
        u = self.users
        new, hist_noise = self._new_users(mask)
        if new is not None:
            u.reset(mask, new)
        hist = (u.long + 0.35 * hist_noise.astype(np.float32))
        hist /= np.linalg.norm(hist, axis=1, keepdims=True)
        prior = self._prior
        if self.corpus.localized:  # the system knows where the request comes from and the app's language
            self.view.region[mask] = u.region[mask]
            self.view.language[mask] = u.language[mask]
            if self.cfg.pipeline.regional_prior:
                prior = regional_prior(self.corpus.catalog, u.region, u.language, self._prior,
                                       self.cfg.corpus.n_languages, table=self._regional_priors())
        self.view.reset(mask, u.key, hist, u.cold, prior, *self._history(u))
        self.view.days_since_signup[mask] = u.tenure[mask]
        self.view.hours_since_last_visit[mask] = np.where(u.cold, 0.0, 20.0)[mask]
        self.pipeline.reset(mask)
        self.steps[mask] = 0
        self.new_session[mask] = True
        self.view.start_session(mask, np.zeros(b, np.float32), np.ones(b, bool))
        self.view.sessions_today[mask] = 1
        return self.observe(knobs_from_action(np.zeros((b, N_KNOBS), np.float32), self.cfg.pipeline))

    def _regional_priors(self) -> Array:
        """:func:`rankers.sourcing.regional_priors` of the catalog now, computed once per world tick."""
        cat = self.corpus.catalog
        key = (cat.world_day, cat.n_items)
        if self._priors_key != key:
            self._priors_key = key
            self._priors = regional_priors(cat, self.cfg.corpus.n_languages, self._prior)
        return self._priors

    def _history(self, u: Users) -> tuple[Array, Array, Array]:
        """What the platform logged of each user before the episode, for the system's view: (B, T) engaged videos
        per topic (``HISTORY_VIDEOS`` spread over the user's interest topics by their weights) and (B,) the
        observed visit rate (sessions a day at the user's satisfaction reference and habit, times a
        LogNormal(0, 0.25) measurement noise keyed by the user) and (B, 2) long-run like and share rates (the
        population's ``LOGGED_RATES`` times the user's propensity ``exp(social)``, with the same noise). New users
        have none (zeros)."""
        b, t = u.key.shape[0], self.corpus.topic_centre.shape[0]
        counts = np.zeros((b, t), np.float32)
        rows = np.broadcast_to(np.arange(b)[:, None], u.topics.shape)
        np.add.at(counts, (rows, u.topics), HISTORY_VIDEOS * u.topic_wts)
        ref = np.full(b, self.cfg.users.satisfaction_ref, np.float32)
        rate, _ = u.clocks(ref, u.habit)
        rate = rate * np.exp(0.25 * hash_normal(self.noise_salt, 6, u.key))
        # long-run like and share rates: the population's, times the user's participation propensity (a logit
        # offset of a rare event is about a rate multiplier), times a LogNormal(0, 0.25) measurement noise, at most 1
        prior = np.asarray([LOGGED_RATES[n] for n in LONG_RATE_NAMES], np.float32)
        noise = np.stack([hash_normal(self.noise_salt, 7 + i, u.key) for i in range(prior.size)], axis=1)
        rates = np.minimum(prior[None, :] * np.exp(u.social[:, None] + 0.25 * noise), 1.0)
        est = ~u.cold
        return counts * est[:, None], (rate * est).astype(np.float32), (rates * est[:, None]).astype(np.float32)

    def observe(self, knobs: Knobs) -> Array:
        """(B, D) float32 observation of what the system can observe (see ``layout``)."""
        return self.layout.build(self.view, self.pipeline.pool_summary(knobs), self.users.day, knobs)

    def retire(self, mask: Array) -> None:
        """Drops the users in ``mask`` (B,) from the batch for good; later steps serve, observe and return
        only the others, in the same order (``uid`` maps them to the built batch's rows).

        A user's random numbers are keyed by the user (:meth:`_noise`), so they do not depend on who
        else was retired (common random numbers across policies hold). The users left stand for the
        whole population (``population / B`` real users each), so the world's traffic keeps its volume,
        as a platform's does while its users churn and others join."""
        mask = np.asarray(mask, bool)
        if mask.shape != (self.n_users,):
            raise ValueError(f"retire mask has shape {mask.shape}, expected ({self.n_users},)")
        if not mask.any():
            return
        if mask.all():
            raise ValueError("retire would leave no users; stop stepping instead")
        keep = np.flatnonzero(~mask)
        for obj, names in self._row_fields():
            take_rows(obj, names, keep)
        self.pipeline.rows_changed()

    def _noise(self, s: int, p: int) -> tuple[Array, Array, Array, Array]:
        """This request's random numbers, keyed by each user and where the user is in their life rather than
        by the batch's step: (B, S, 9) response uniforms and (B, S) watch-noise normals at (user, request
        of the episode, slate position), (B, 4) session uniforms at (user, session of the episode), (B, P)
        Thompson-sampling normals at (user, request). Common random numbers that stay in step with each
        user: under two policies a user meets the same numbers at the same request and session of their
        life, however far apart the two lives' clocks have drifted, whoever else is in the batch
        (:meth:`retire`). Normals are Irwin-Hall (n = 4, ``rankers.hashing.hash_normal``: |z| < 3.5)."""
        b = self.n_users
        r_resp = np.empty((b, s, 9), np.float32)
        n_resp = np.empty((b, s), np.float32)
        r_sess = np.empty((b, 4), np.float64)
        ts_noise = np.empty((b, p), np.float32)
        _request_noise(self.noise_salt, self.users.key, self.steps, self.users.n_sessions, r_resp, n_resp, r_sess,
                       ts_noise)
        return r_resp, n_resp, r_sess, ts_noise

    # ------------------------------------------------------------------ one request per user
    @contextmanager
    def frozen_world(self) -> Iterator[None]:
        """Steps inside serve their users but leave the world as it is: no traffic recorded into the corpus's
        counters, no tick of its clock (uploads, trends). A planner's look-ahead on clones of its users
        (``agents.planner``, without foresight) runs inside, so that only the committed lives move the world."""
        self.frozen = True
        try:
            yield
        finally:
            self.frozen = False

    def _row_fields(self) -> list[tuple[object, tuple[str, ...]]]:
        """Every per-user array of the batch, as (holder, attribute names): what :meth:`copy_users` (all but
        ``uid``) and :meth:`retire` take rows of, and what a masked :meth:`step` sets aside and puts back."""
        pool = self.pipeline.pool
        own = ("steps", "new_session", "uid", "user_generation") + (("user_identity",) if self.user_identity is not None
                                                                      else ())
        return [(self.users, Users.PER_USER), (self.view, UserView.PER_USER),
                (pool, tuple(pool.__dataclass_fields__)), (self.pipeline, Pipeline.PER_USER), (self, own)]

    def step(self, action: Array, active: Array | None = None) -> StepResult:
        """Serves one feed request to every user under ``action`` (B, A) in [-1, 1]; with ``active`` (B,) bool,
        only to those users: the others wait where they are (their state, clock and random numbers do not move,
        since a user's random numbers are keyed by their own request count, :meth:`_noise`) and get a zero
        observation, reward and metrics and False flags in the result. The world's clock advances by one step
        and the active users stand for the whole population that step, as after :meth:`retire` (with no user
        active nothing happens).
        Per-session decisions (:class:`envs.sessions.SessionSteps`) step the users whose session goes on."""
        b = self.n_users
        a = validate_action(action, b)
        if active is None:
            return self._step(a)
        act = np.asarray(active)
        if act.shape != (b,) or act.dtype != bool:
            raise ValueError(f"active must be a ({b},) bool mask of the users to step; got shape {act.shape}, "
                             f"dtype {act.dtype}")
        if act.all():
            return self._step(a)
        rows = np.flatnonzero(act)
        if rows.size == 0:
            return StepResult(np.zeros((b, self.layout.dim), np.float32), np.zeros(b, np.float32),
                              np.zeros(b, bool), np.zeros(b, bool),
                              {k: np.zeros(b, np.float32) for k in STEP_METRICS})
        held = [[getattr(obj, n) for n in names] for obj, names in self._row_fields()]
        for obj, names in self._row_fields():
            take_rows(obj, names, rows)
        self.pipeline.rows_changed()
        try:
            res = self._step(a[rows])
        finally:
            for (obj, names), full in zip(self._row_fields(), held, strict=True):
                for n, arr in zip(names, full, strict=True):
                    arr[rows] = getattr(obj, n)
                    setattr(obj, n, arr)
            self.pipeline.rows_changed()

        def spread(x: Array) -> Array:
            out = np.zeros((b, *x.shape[1:]), x.dtype)
            out[rows] = x
            return out

        info = {k: spread(v) for k, v in res.info.items() if k in STEP_METRICS}
        return StepResult(spread(res.obs), spread(res.reward), spread(res.terminated), spread(res.truncated), info)

    def _step(self, a: Array) -> StepResult:
        """:meth:`step` of every user in the batch, ``a`` validated."""
        t_start = time.perf_counter()
        cfg, b = self.cfg, self.n_users
        knobs = knobs_from_action(a, cfg.pipeline)
        u, view, pipe = self.users, self.view, self.pipeline
        r_resp, n_resp, r_sess, ts_noise = self._noise(cfg.pipeline.slate_size, cfg.pipeline.n_rank)
        clock0 = u.day + u.s_minutes / 1440.0  # the user's time before this request, in days

        # New sessions start (context shift), then stages 1-3 where the pool ran low.
        if self.new_session.any():
            pipe.start_session(self.new_session)
            self.new_session[:] = False
        pipe.refresh(pipe.needs_refresh(), knobs)
        feed = pipe.rebalance(knobs, ts_noise)
        slate = pipe.make_slate(feed, knobs)
        resp = u.respond(slate.item, slate.ad, self.corpus, slate.break_prompt, r_resp, n_resp)
        shown = resp["shown"]
        fb = Feedback(shown=shown, **{k: resp[k] for k in ("watch_s", "watch_frac")},
                      **{k: resp[k].astype(bool) for k in ("complete", "like", "share", "comment", "follow", "skip",
                                                           "not_interested", "regret")},
                      mute_topic=resp.get("mute_topic"), mute_creator=resp.get("mute_creator"))
        view.update(self.corpus.catalog, slate.item, fb, cfg.pipeline.engaged_watch_frac,
                    cfg.pipeline.skipped_watch_frac)
        view.record_prompts(resp["prompted"], resp["took_break"])
        pipe.consume(feed, slate, shown.sum(axis=1))
        if not self.frozen:  # the users stand for everyone
            self.corpus.record(slate.item, shown, resp, cfg.population / b, u.region)

        # Sessions that ended: return gap, churn, horizon.
        self.steps += 1
        ended = resp["left"]
        gap = np.zeros(b, np.float32)
        feel = np.zeros(b, np.float32)
        terminated = np.zeros(b, bool)
        truncated = np.zeros(b, bool)
        returned = np.zeros(b, bool)
        sess_videos = u.s_videos.copy()
        sess_minutes = u.s_minutes.copy()
        clock_mid = u.day + sess_minutes / 1440.0  # the user's time at the end of this request
        p_churn = np.zeros(b, np.float32)
        if ended.any():
            g, f, p_over = u.end_session(ended, resp["took_break"], r_sess, cfg.churn_days)
            gap = np.where(ended, g, 0.0).astype(np.float32)
            feel = np.where(ended, f, 0.0)
            end_day = u.day + u.s_minutes / 1440.0
            can_churn = ended & (end_day + cfg.churn_days <= cfg.horizon_days)
            churn = can_churn & (gap > cfg.churn_days)
            p_churn = np.where(can_churn, p_over, 0.0).astype(np.float32)
            horizon = ended & ~churn & (end_day + gap >= cfg.horizon_days)
            terminated = churn
            truncated = horizon
            returned = ended & ~churn & ~horizon
            prev_day = u.day.copy()
            u.day = np.where(returned, end_day + gap, u.day).astype(np.float32)
            u.start_session(returned, r_sess[:, 2].astype(np.float32) * 2 - 1, gap)
            new_day = np.floor(u.day) > np.floor(prev_day)
            view.start_session(returned, gap * 24.0, new_day)
            self.new_session |= returned
        else:
            u.day = u.day
        truncated |= (self.steps >= cfg.max_steps) & ~terminated

        # World clock.
        if not self.frozen:
            self.world_day += cfg.world_days_per_step
            self.corpus.tick(cfg.world_days_per_step, self.world_day)
        self.total_steps += 1

        # the time this step took for the user (semi-MDP discounting): the request, then the gap if the session
        # ended (censored at churn_days for a churn, at the horizon for the last session)
        to_horizon = np.maximum(cfg.horizon_days - clock_mid, 0.0)
        wait = np.where(terminated, cfg.churn_days,
                        np.minimum(np.where(np.isfinite(gap), gap, cfg.churn_days), to_horizon))
        elapsed = (clock_mid - clock0 + np.where(ended, wait, 0.0)).astype(np.float32)
        reward = self._reward(resp, returned, terminated, p_churn, gap)
        info = self._metrics(slate, feed, resp, knobs, ended, returned, terminated, gap, feel, sess_videos,
                             sess_minutes)
        info["retention/elapsed_days"] = elapsed
        obs = self.observe(knobs)
        self.latency["total"] += time.perf_counter() - t_start
        return StepResult(obs, reward, terminated, truncated & ~terminated, info)

    def integrity(self) -> dict[str, float]:
        """The engagement-integrity detector against the truth, now (``CorpusConfig.bot_rings_per_day``,
        ``PipelineConfig.bot_filter``): the share of its flags on manipulated items (targets of a ring, running
        or past: their counters carry the fake engagement), the share of running rings' targets it flags, its
        false-positive rate over never-manipulated items, and the share of genuine trending bursts it
        suppresses."""
        corpus, n = self.corpus, self.corpus.n_items
        boosted = corpus.boost_days[:n] > 0
        manipulated = corpus.ever_boosted[:n]
        flagged = np.zeros(n, bool)
        flagged[self.pipeline.tables.flagged[self.pipeline.tables.flagged < n]] = True
        genuine = (corpus.trend[:n] > 0.1 * self.cfg.corpus.trend_strength) & ~manipulated
        return {"precision": float((flagged & manipulated).sum()) / max(float(flagged.sum()), 1.0),
                "recall": float((flagged & boosted).sum()) / max(float(boosted.sum()), 1.0),
                "false_positive_rate": float((flagged & ~manipulated).sum()) / max(float((~manipulated).sum()), 1.0),
                "genuine_trends_suppressed": float((flagged & genuine).sum()) / max(float(genuine.sum()), 1.0),
                "boosted_items": float(boosted.sum()), "flagged_items": float(flagged.sum())}

    # ------------------------------------------------------------------ reward and metrics
    def _reward(self, resp: dict[str, Array], returned: Array, churned: Array, p_churn: Array, gap: Array) -> Array:
        r = self.cfg.reward
        watch_min = (resp["watch_s"] * resp["shown"]).sum(axis=1) / 60.0
        if r.mode == "retention":
            return returned.astype(np.float32)
        if r.mode == "churn":
            return -churned.astype(np.float32)
        if r.mode == "churn_expected":
            return -p_churn
        if r.mode == "engagement":
            return watch_min.astype(np.float32)
        if r.mode == "return_time":  # RLUR (Cai et al. 2023): minus the days until the user's next visit
            wait = np.where(returned, gap, 0.0) + np.where(churned, self.cfg.churn_days, 0.0)
            return (-wait).astype(np.float32)
        if r.mode != "composite":  # a mode added to REWARD_MODES without its branch here
            raise NotImplementedError(f"reward mode {r.mode!r} has no branch in FeedSimulator._reward")
        return (r.w_return * returned + r.w_watch_min * watch_min + r.w_like * resp["like"].sum(1)
                + r.w_share * resp["share"].sum(1) + r.w_regret * resp["regret"].sum(1)).astype(np.float32)

    def _metrics(self, slate: Any, feed: Any, resp: dict[str, Array], knobs: Knobs, ended: Array, returned: Array,
                 terminated: Array, gap: Array, feel: Array, sess_videos: Array, sess_minutes: Array) -> dict[str, Any]:
        cat = self.corpus.catalog
        shown = resp["shown"]
        vid = shown & (slate.item >= 0)
        safe = np.maximum(slate.item, 0)
        newc = cat.item_is_new_creator(slate.item) & vid
        t = cat.n_topics
        counts = np.zeros((self.n_users, t), np.float32)
        np.add.at(counts, (np.broadcast_to(np.arange(self.n_users)[:, None], vid.shape)[vid], cat.topic[safe][vid]), 1)
        n = np.maximum(vid.sum(1), 1)
        pt = counts / n[:, None]
        ent = -(pt * np.log(np.where(pt > 0, pt, 1.0))).sum(1) / np.log(t)
        e = cat.emb[safe] * vid[..., None]
        sum_e = e.sum(1)
        pair = ((sum_e * sum_e).sum(1) - (e * e).sum((1, 2))) / np.maximum(n * (n - 1), 1)
        ild = np.where(n > 1, 1.0 - pair, 0.0)
        boosted = self.corpus.boosted(slate.item) & vid  # served targets of engagement rings (hidden truth)
        trending = (slate.source == SRC_TRENDING) & vid
        m = {
            "engagement/videos": vid.sum(1), "engagement/watch_s": (resp["watch_s"] * shown).sum(1),
            "engagement/completes": resp["complete"].sum(1), "engagement/likes": resp["like"].sum(1),
            "engagement/shares": resp["share"].sum(1), "engagement/comments": resp["comment"].sum(1),
            "engagement/follows": resp["follow"].sum(1), "engagement/skips": resp["skip"].sum(1),
            "engagement/regrets": resp["regret"].sum(1), "engagement/not_interested": resp["not_interested"].sum(1),
            "engagement/harmful": resp["harmful"].sum(1), "slate/ads": (shown & (slate.ad >= 0)).sum(1),
            "slate/topic_entropy": ent, "slate/intra_list_distance": ild,
            "slate/explore_shown": (slate.explore & vid).sum(1), "slate/rule_relaxed": feed.rule_relaxed,
            "creators/new_creator_impressions": newc.sum(1),
            "creators/new_creator_follows": (resp["follow"].astype(bool) & newc).sum(1),
            "retention/session_end": ended, "retention/returned": returned, "retention/churned": terminated,
            "retention/gap_days": np.where(np.isfinite(gap), gap, self.cfg.churn_days),
            "retention/session_videos": np.where(ended, sess_videos, 0), "retention/session_minutes":
                np.where(ended, sess_minutes, 0), "retention/session_feeling": feel,
            "retention/break_prompted": slate.break_prompt, "retention/break_taken": resp["took_break"],
            "retention/day": self.users.day,
            "integrity/boosted_impressions": boosted.sum(1), "integrity/trending_impressions": trending.sum(1),
            "integrity/boosted_trending_impressions": (boosted & trending).sum(1),
        }
        info: dict[str, Any] = {k: np.asarray(v, np.float32) for k, v in m.items()}
        info["slate"] = slate
        info["responses"] = resp  # per-position responses: (B, S) arrays (+ (B,) "left", "took_break", "prompted")
        return info
