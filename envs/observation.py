"""The flat float32 observation and its named-slice layout.

Only what a production system can observe: the system's user estimate (not the true interest),
recent and long-run engagement rates, the share of take-a-break prompts followed, session length and time,
tenure, time since last visit, the cold-start flag, follows and summaries of the candidate pool.
``layout["user.recent_rates"]`` gives the slice, so analysis code never hard-codes offsets.
"""

from __future__ import annotations

import numpy as np

from envs.config import FeedConfig
from rankers.knobs import Knobs
from rankers.types import Array
from rankers.user_model import LONG_RATE_NAMES, RATE_NAMES, UserView

POOL_FIELDS = ("score_spread", "uncertainty", "topic_entropy", "new_creator_share", "remaining")


class ObservationLayout:
    """Named slices of the observation vector. ``layout.names`` lists every scalar's name."""

    def __init__(self, cfg: FeedConfig) -> None:
        d = cfg.corpus.emb_dim
        parts = [
            ("user.embedding", d),
            ("user.recent_rates", len(RATE_NAMES)),
            ("user.long_rates", len(LONG_RATE_NAMES)),
            ("user.days_since_signup", 1),
            ("user.hours_since_last_visit", 1),
            ("user.cold_start", 1),
            ("user.follows", 1),
            ("user.impressions", 1),
            ("user.visit_rate", 1),
            ("user.topic_entropy", 1),
            ("user.break_take_rate", 1),
            ("session.videos", 1),
            ("session.minutes", 1),
            ("session.index_today", 1),
            ("session.engaged_topics", 1),
            ("session.skipped_topics", 1),
            ("session.break_due", 1),
            ("episode.day", 1),
            ("pool.summary", len(POOL_FIELDS)),
        ]
        self.slices: dict[str, slice] = {}
        self.names: list[str] = []
        o = 0
        for name, n in parts:
            self.slices[name] = slice(o, o + n)
            if name == "user.recent_rates":
                self.names += [f"user.rate_{r}" for r in RATE_NAMES]
            elif name == "user.long_rates":
                self.names += [f"user.long_rate_{r}" for r in LONG_RATE_NAMES]
            elif name == "pool.summary":
                self.names += [f"pool.{f}" for f in POOL_FIELDS]
            elif n > 1:
                self.names += [f"{name}[{i}]" for i in range(n)]
            else:
                self.names.append(name)
            o += n
        self.dim = o
        self.horizon = cfg.horizon_days

    def __getitem__(self, name: str) -> slice:
        if name in self.slices:
            return self.slices[name]
        if name in self.names:
            i = self.names.index(name)
            return slice(i, i + 1)
        raise KeyError(f"no observation field {name!r}; fields: {list(self.slices)}")

    def build(self, v: UserView, pool: dict[str, Array], day: Array, knobs: Knobs) -> Array:
        """(B, D) float32 observations of the users of the system's view ``v``, from the pool summary ``pool``
        (``Pipeline.pool_summary``), each user's (B,) episode ``day`` and the ``knobs`` served."""
        cols = [
            v.emb,
            v.rates,
            v.long_rates,
            np.log1p(v.days_since_signup)[:, None] / 7.0,
            np.log1p(v.hours_since_last_visit)[:, None] / 7.0,
            v.cold_start[:, None],
            np.log1p(v.n_follows)[:, None] / 4.0,
            np.log1p(v.n_impressions)[:, None] / 10.0,
            np.log1p(v.visit_rate())[:, None],
            v.topic_entropy()[:, None],
            v.break_take_rate()[:, None],
            v.session_videos[:, None] / 100.0,
            v.session_minutes[:, None] / 60.0,
            v.sessions_today[:, None] / 5.0,
            *(t.sum(1, keepdims=True) / 10.0 for t in v.session_topics()),
            (v.session_minutes / knobs.break_after_min)[:, None],
            day[:, None] / self.horizon,
            np.stack([pool[f] for f in POOL_FIELDS], axis=1),
        ]
        obs = np.concatenate([np.asarray(c, np.float32).reshape(day.shape[0], -1) for c in cols], axis=1)
        return np.clip(obs, -10.0, 10.0).astype(np.float32)
