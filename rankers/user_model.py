"""The system's estimate of each user, built only from observed engagement events.

This is the recommender's memory (a feature store row per user): an interest embedding that
follows engaged items, per-topic engagement, recent engagement rates, follows, recently shown
items, and the in-session profile the seed's ``RealTimeAdapter`` keeps (engaged/skipped topics).
"""

from __future__ import annotations

import numpy as np

from rankers.types import Array, Catalog, Feedback, take_rows

RATE_NAMES: tuple[str, ...] = ("like", "complete", "skip", "share", "follow", "not_interested", "watch_frac")
LONG_RATE_NAMES: tuple[str, ...] = ("like", "share")
"""Rates also kept over the long run (``UserView.long_rates``: ~500 items), what a user's participation shows."""
_LONG_COLS = [RATE_NAMES.index(n) for n in LONG_RATE_NAMES]


class ControlError(ValueError):
    """A user control that names a topic, creator or user that does not exist."""


class UserView:
    """State of B users as the recommender sees them. Updated in place, never resets on its own."""

    def __init__(self, n_users: int, emb_dim: int, n_topics: int, max_follows: int = 64,
                 seen_memory: int = 400, rate_decay: float = 0.05, emb_lr: float = 0.05, max_muted: int = 32,
                 n_creators: int | None = None, long_rate_decay: float = 0.002) -> None:
        b = n_users
        self.n_creators = n_creators  # for checking user controls (None: unchecked above 0)
        self.user_key = np.zeros(b, np.uint32)  # (B,) the system's user id
        self.emb = np.zeros((b, emb_dim), np.float32)  # (B, D) interest estimate
        self.prior = np.zeros(emb_dim, np.float32)  # (D,) population mean used for cold start
        self.topic_engaged = np.zeros((b, n_topics), np.float32)  # (B, T) decayed engaged counts
        self.rates = np.zeros((b, len(RATE_NAMES)), np.float32)  # (B, R) EMA of per-item rates
        self.long_rates = np.zeros((b, len(LONG_RATE_NAMES)), np.float32)  # (B, 2) long-run like and share rates
        self.follows = np.full((b, max_follows), -1, np.int32)  # (B, F) followed creators ring
        self.n_follows = np.zeros(b, np.int64)
        self.seen = np.full((b, seen_memory), -1, np.int32)  # (B, H) recently shown items ring
        self.n_seen = np.zeros(b, np.int64)
        self.session_engaged = np.zeros((b, n_topics), np.float32)  # (B, T) engaged videos per topic this session
        self.session_skipped = np.zeros((b, n_topics), np.float32)  # (B, T) skipped videos per topic this session
        self.session_videos = np.zeros(b, np.float32)
        self.session_minutes = np.zeros(b, np.float32)
        self.sessions_today = np.zeros(b, np.float32)
        self.days_since_signup = np.zeros(b, np.float32)
        self.hours_since_last_visit = np.zeros(b, np.float32)
        self.n_impressions = np.zeros(b, np.float32)
        self.cold_start = np.zeros(b, bool)
        self.mean_gap_days = np.zeros(b, np.float32)  # (B,) EMA of the days between sessions (0 = none seen)
        self.prompts = np.zeros(b, np.float32)  # (B,) take-a-break prompts the user saw
        self.breaks = np.zeros(b, np.float32)  # (B,) of them, the ones the user followed
        self.refreshes = np.zeros(b, np.int64)  # pool refresh counter (seeds the pseudo-random sources)
        self.muted_topic = np.zeros((b, n_topics), bool)  # (B, T) topics the user muted (a user control)
        self.muted_creator = np.full((b, max_muted), -1, np.int32)  # (B, M) muted creators ring (-1 = empty)
        self.n_muted_creators = np.zeros(b, np.int64)
        self.region = np.zeros(b, np.int16)  # (B,) geo region (observable: the request's location)
        self.language = np.zeros(b, np.int16)  # (B,) the app's language setting
        self.rate_decay = rate_decay
        self.long_rate_decay = long_rate_decay
        self.emb_lr = emb_lr

    #: Attributes with one row per user (:meth:`take`).
    PER_USER: tuple[str, ...] = (
        "user_key", "emb", "topic_engaged", "rates", "long_rates", "follows", "n_follows", "seen", "n_seen",
        "session_engaged", "session_skipped", "session_videos", "session_minutes", "sessions_today",
        "days_since_signup", "hours_since_last_visit", "n_impressions", "cold_start", "mean_gap_days", "prompts",
        "breaks", "refreshes", "muted_topic", "muted_creator", "n_muted_creators", "region", "language")

    @property
    def n_users(self) -> int:
        return int(self.emb.shape[0])

    def take(self, rows: Array) -> None:
        """Keeps only the users ``rows`` (the batch shrinks to them, in this order)."""
        take_rows(self, self.PER_USER, rows)

    def reset(self, mask: Array, user_key: Array, history_emb: Array, cold_start: Array, prior: Array,
              history_topics: Array | None = None, visit_rate: Array | None = None,
              history_rates: Array | None = None) -> None:
        """Starts new users where ``mask``: ``user_key`` (B,) uint32 ids, ``history_emb`` (B, D) the
        estimate from their past (ignored where ``cold_start``), ``prior`` (D,) the population mean
        the system uses instead (or (B, D): one per user, e.g. by region and language); optionally their
        logged ``history_topics`` (B, T) engaged videos per topic, observed ``visit_rate`` (B,) sessions a
        day (0 = unknown) and logged long-run like and share rates ``history_rates`` (B, 2) (0 = unknown: the
        population's)."""
        self.user_key[mask] = user_key[mask]
        self.prior = prior.astype(np.float32)
        per_user = prior if prior.ndim == 2 else prior[None, :]
        emb = np.where(cold_start[:, None], per_user, history_emb).astype(np.float32)
        self.emb[mask] = emb[mask]
        for arr in (self.topic_engaged, self.rates, self.n_follows, self.n_seen, self.session_engaged,
                    self.session_skipped, self.session_videos, self.session_minutes, self.sessions_today,
                    self.days_since_signup, self.hours_since_last_visit, self.n_impressions, self.refreshes,
                    self.prompts, self.breaks):
            arr[mask] = 0
        self.rates[mask] = _RATE_PRIOR
        prior_long = _RATE_PRIOR[[RATE_NAMES.index(n) for n in LONG_RATE_NAMES]]
        hist = np.zeros_like(self.long_rates) if history_rates is None else np.asarray(history_rates, np.float32)
        self.long_rates[mask] = np.where(hist > 0, hist, prior_long[None, :])[mask]
        if history_topics is not None:
            self.topic_engaged[mask] = history_topics[mask]
        rate = np.zeros(self.n_users, np.float32) if visit_rate is None else np.asarray(visit_rate, np.float32)
        self.mean_gap_days[mask] = np.where(rate > 0, 1.0 / np.maximum(rate, 1e-3), 0.0)[mask]
        self.follows[mask] = -1
        self.seen[mask] = -1
        self.muted_topic[mask] = False
        self.muted_creator[mask] = -1
        self.n_muted_creators[mask] = 0
        self.cold_start[mask] = cold_start[mask]

    def mute(self, rows: Array, topic: Array | None = None, creator: Array | None = None) -> None:
        """User controls: the users ``rows`` mute ``topic`` and/or ``creator`` (one per row; -1 = none). The
        pipeline serves none of their items from the next request on (:meth:`muted`). A topic or creator that
        does not exist raises :class:`ControlError`."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_users):
            raise ControlError(f"mute: rows must be in [0, {self.n_users}); got {rows.min()}..{rows.max()}")
        n_topics = self.muted_topic.shape[1]
        if topic is not None:
            t = np.broadcast_to(np.asarray(topic, np.int64), rows.shape)
            if np.any((t < -1) | (t >= n_topics)):
                raise ControlError(f"mute: no topic {t[(t < -1) | (t >= n_topics)][0]} in this world "
                                   f"(topics are 0..{n_topics - 1})")
            on = t >= 0
            self.muted_topic[rows[on], t[on]] = True
        if creator is not None:
            c = np.broadcast_to(np.asarray(creator, np.int64), rows.shape)
            top = np.iinfo(np.int64).max if self.n_creators is None else self.n_creators
            bad = (c < -1) | (c >= top)
            if bad.any():
                raise ControlError(f"mute: no creator {c[bad][0]} in this world (creators are 0..{top - 1})")
            for r, cr in zip(rows[c >= 0], c[c >= 0], strict=True):  # a few a request: a plain loop
                if not (self.muted_creator[r] == cr).any():
                    self.muted_creator[r, self.n_muted_creators[r] % self.muted_creator.shape[1]] = cr
                    self.n_muted_creators[r] += 1

    def muted(self, rows: Array, topic: Array, creator: Array) -> Array:
        """(len(rows), N) bool: items of ``topic`` / ``creator`` (len(rows), N) that the users ``rows`` muted."""
        rows = np.asarray(rows)
        t = self.muted_topic[rows[:, None], np.maximum(topic, 0)]
        if not self.n_muted_creators.any():
            return t
        mc = self.muted_creator[rows]  # (R, M)
        return t | (creator[:, :, None] == mc[:, None, :]).any(axis=2) & (creator >= 0)

    def visit_rate(self) -> Array:
        """(B,) observed sessions a day (1 / the EMA of the gaps between sessions; 0 before any gap is seen)."""
        return np.where(self.mean_gap_days > 0, 1.0 / np.maximum(self.mean_gap_days, 0.01), 0.0).astype(np.float32)

    def record_prompts(self, prompted: Array, took_break: Array) -> None:
        """Counts the take-a-break prompts the users saw (``prompted`` (B,) bool) and followed (``took_break``)."""
        self.prompts += prompted
        self.breaks += prompted & took_break

    def break_take_rate(self) -> Array:
        """(B,) share of the prompts seen that the user followed, with one prompt followed and one not as a prior
        (0.5 before any prompt)."""
        return ((self.breaks + 1.0) / (self.prompts + 2.0)).astype(np.float32)

    def topic_entropy(self) -> Array:
        """(B,) normalised entropy of the user's engaged topics over their history (0 = none or one topic)."""
        tot = self.topic_engaged.sum(axis=1, keepdims=True)
        p = self.topic_engaged / np.maximum(tot, 1e-6)
        ent = -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=1)
        return (ent / np.log(max(self.topic_engaged.shape[1], 2))).astype(np.float32)

    def session_topics(self) -> tuple[Array, Array]:
        """(B, T) bool engaged and skipped topics of this session. A topic counts as engaged when
        more of its videos were engaged (> 50 % watched) than skipped (< 10 %), and the reverse for
        skipped: the seed's sets, made robust to a topic appearing in both."""
        return self.session_engaged > self.session_skipped, self.session_skipped > self.session_engaged

    def start_session(self, mask: Array, gap_hours: Array, new_day: Array) -> None:
        """Marks the start of a new session for users in ``mask`` after ``gap_hours`` (B,)."""
        self.session_engaged[mask] = 0.0
        self.session_skipped[mask] = 0.0
        self.session_videos[mask] = 0
        self.session_minutes[mask] = 0
        self.hours_since_last_visit[mask] = gap_hours[mask]
        gap_d = np.asarray(gap_hours, np.float32) / 24.0
        ema = np.where(self.mean_gap_days > 0, self.mean_gap_days + 0.3 * (gap_d - self.mean_gap_days), gap_d)
        upd = mask & (gap_d > 0)  # a reset starts a first session with no gap
        self.mean_gap_days[upd] = ema[upd]
        self.days_since_signup[mask] += gap_hours[mask] / 24.0
        self.sessions_today[mask & new_day] = 0
        self.sessions_today[mask] += 1

    def update(self, catalog: Catalog, item: Array, fb: Feedback, engaged_frac: float,
               skipped_frac: float) -> None:
        """Folds observed feedback on ``item`` (B, S) into the estimate. Vectorised over users."""
        shown = fb.shown & (item >= 0)
        n = shown.sum(axis=1).astype(np.float32)
        safe = np.where(shown, item, 0)
        topic = catalog.topic[safe]
        # Interest embedding: move toward engaged items, away from not-interested ones.
        engage_w = (fb.watch_frac * (1 + fb.like + fb.share + fb.follow) - 0.5 * fb.not_interested - 0.3 * fb.skip)
        engage_w = np.where(shown, engage_w, 0.0).astype(np.float32)
        delta = np.einsum("bs,bsd->bd", engage_w, catalog.emb[safe])
        self.emb += self.emb_lr * delta
        norm = np.linalg.norm(self.emb, axis=1, keepdims=True)
        np.divide(self.emb, np.maximum(norm, 1.0), out=self.emb)
        # Per-topic engagement and the in-session profile (seed: > 50 % engaged, < 10 % skipped).
        rows = np.broadcast_to(np.arange(self.n_users)[:, None], item.shape)
        engaged = shown & (fb.watch_frac > engaged_frac)
        skipped = shown & (fb.watch_frac < skipped_frac)
        self.topic_engaged *= 0.995
        np.add.at(self.topic_engaged, (rows[engaged], topic[engaged]), 1.0)
        np.add.at(self.session_engaged, (rows[engaged], topic[engaged]), 1.0)
        np.add.at(self.session_skipped, (rows[skipped], topic[skipped]), 1.0)
        # Follows observed.
        fol = shown & fb.follow
        if fol.any():
            r, c = np.nonzero(fol)
            slot = self.n_follows[r] % self.follows.shape[1]
            # several follows of one user in one slate: offset their slots
            order = np.argsort(r, kind="stable")
            r, c, slot = r[order], c[order], slot[order]
            first = np.r_[0, np.flatnonzero(np.diff(r)) + 1]
            offs = np.arange(r.size) - np.repeat(first, np.diff(np.r_[first, r.size]))
            self.follows[r, (slot + offs) % self.follows.shape[1]] = catalog.creator[item[r, c]]
            np.add.at(self.n_follows, r, 1)
        # Recently shown items (to filter repeats).
        h = self.seen.shape[1]
        pos = (self.n_seen[:, None] + np.cumsum(shown, axis=1) - 1) % h
        self.seen[rows[shown], pos[shown]] = item[shown]
        self.n_seen += shown.sum(axis=1)
        # Engagement-rate EMAs over shown items.
        obs = np.stack([fb.like, fb.complete, fb.skip, fb.share, fb.follow, fb.not_interested, fb.watch_frac],
                       axis=-1).astype(np.float32)
        mean = (obs * shown[..., None]).sum(axis=1) / np.maximum(n, 1)[:, None]
        w = 1.0 - (1.0 - self.rate_decay) ** n
        self.rates += w[:, None] * (mean - self.rates)
        wl = 1.0 - (1.0 - self.long_rate_decay) ** n
        self.long_rates += wl[:, None] * (mean[:, _LONG_COLS] - self.long_rates)
        self.n_impressions += n
        self.session_videos += n
        self.session_minutes += np.where(shown, fb.watch_s + 1.0, 0).sum(axis=1) / 60.0
        self.cold_start &= self.n_impressions < 20
        # User controls used on this slate.
        for flag, kind in ((fb.mute_topic, "topic"), (fb.mute_creator, "creator")):
            if flag is not None and flag.any():
                r, c = np.nonzero(flag & shown)
                ids = catalog.topic[item[r, c]] if kind == "topic" else catalog.creator[item[r, c]]
                self.mute(r, **{kind: ids})


_RATE_PRIOR = np.array([0.05, 0.3, 0.3, 0.01, 0.005, 0.01, 0.4], np.float32)
