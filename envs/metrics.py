"""Per-user episode metrics, defined once: what "30-day retention", "regret rate", ... mean.

:class:`EpisodeMetrics` folds the per-step ``info`` of :class:`envs.simulator.FeedSimulator`
(``STEP_METRICS``, each (B,) float32) into per-user totals while a user's episode is running, and
:meth:`EpisodeMetrics.per_user` turns them into the (B,) float64 metrics below. Steps after a
user's episode ended (terminated or truncated, no autoreset) are ignored.

Definitions (``DEFINITIONS`` gives the same text per metric name):

- ``retention/retained_30d``: the user did not churn: the episode ended by truncation (horizon
  reached), not by termination.
- ``retention/day1_return``, ``retention/day7_return``: the user had a session that started on
  day 1 / day 7 of the episode (``retention/day`` is the user's clock in days since the start).
- ``engagement/session_minutes``: watch minutes per session (per-session engagement): total
  watch minutes / sessions started.
- ``engagement/first_day_watch_minutes``: watch minutes in sessions that started on day 0.
- ``engagement/first_session_watch_minutes``: watch minutes of the first session.
- ``engagement/regret_rate``: regrets / videos; likewise like, share, comment, follow, skip,
  completion (> 80 % watched) and harmful rates per video.
- ``creators/new_creator_share``: new-creator impressions / videos.
- ``creators/new_creator_follows``: follows of new creators per 1000 videos.
- ``slate/topic_entropy``: mean over the user's requests of the slate's normalised topic entropy.
- ``integrity/boosted_share``, ``integrity/boosted_trending_share``: impressions of videos an engagement ring
  is inflating (``CorpusConfig.bot_rings_per_day``), per video served and per video the trending source
  supplied.
"""

from __future__ import annotations

import numpy as np

from rankers.types import Array

#: Metric name -> (definition, higher is better: True / False / None = neither).
DEFINITIONS: dict[str, tuple[str, bool | None]] = {
    "retention/retained_30d": ("share of users not churned (episode truncated by the horizon)", True),
    "retention/day1_return": ("had a session on day 1", True),
    "retention/day7_return": ("had a session on day 7", True),
    "retention/sessions_per_day": ("sessions / days active in the episode", True),
    "retention/active_days": ("days with at least one session", True),
    "retention/mean_return_gap_days": ("mean days between a session's end and the next session (the horizon "
                                       "for users who never returned)", False),
    "engagement/session_minutes": ("watch minutes per session", None),
    "engagement/session_videos": ("videos per session", None),
    "engagement/watch_s_per_video": ("seconds watched per video (skips included)", None),
    "engagement/first_day_watch_minutes": ("watch minutes on day 0", True),
    "engagement/first_session_watch_minutes": ("watch minutes in the first session", True),
    "engagement/watch_minutes": ("watch minutes over the episode", True),
    "engagement/like_rate": ("likes / videos", True),
    "engagement/share_rate": ("shares / videos", True),
    "engagement/comment_rate": ("comments / videos", True),
    "engagement/follow_rate": ("follows / videos", True),
    "engagement/skip_rate": ("skips (< 2 s) / videos", False),
    "engagement/complete_rate": ("completions (> 80 % watched) / videos", None),
    "engagement/regret_rate": ("regrets / videos", False),
    "engagement/harmful_rate": ("harmful exposures / videos", False),
    "creators/new_creator_share": ("new-creator impressions / videos", True),
    "creators/new_creator_follows": ("follows of new creators per 1000 videos", True),
    "creators/new_creator_follow_conversion": ("follows per new-creator impression", True),
    "slate/topic_entropy": ("mean normalised topic entropy of slates", True),
    "slate/intra_list_distance": ("mean pairwise embedding distance within slates", True),
    "slate/ad_load": ("ads per slot shown", None),
    "integrity/boosted_share": ("impressions of videos an engagement ring is inflating / videos", False),
    "integrity/boosted_trending_share": ("of the videos the trending source supplied, the share a ring is "
                                         "inflating", False),
}

_SUMS: tuple[str, ...] = (
    "engagement/videos", "engagement/watch_s", "engagement/completes", "engagement/likes", "engagement/shares",
    "engagement/comments", "engagement/follows", "engagement/skips", "engagement/regrets", "engagement/harmful",
    "slate/topic_entropy", "creators/new_creator_impressions", "creators/new_creator_follows",
    "slate/intra_list_distance", "slate/ads", "integrity/boosted_impressions", "integrity/trending_impressions",
    "integrity/boosted_trending_impressions",
)


def _scatter(a: Array, rows: Array, b: int) -> Array:
    """(len(rows),) values of ``rows`` -> (b,) with zeros elsewhere."""
    out = np.zeros(b, np.asarray(a).dtype)
    out[rows] = a
    return out


class EpisodeMetrics:
    """Accumulates B users' step infos over one episode each (no autoreset)."""

    def __init__(self, n_users: int, horizon_days: float) -> None:
        b = n_users
        self.horizon_days = float(horizon_days)
        self.active = np.ones(b, bool)
        self.sums = {k: np.zeros(b) for k in _SUMS}
        self.steps = np.zeros(b)
        self.sessions = np.ones(b)  # the first session starts at reset
        self.first_day_watch_s = np.zeros(b)
        self.first_session_watch_s = np.zeros(b)
        self.in_first_session = np.ones(b, bool)
        self.day_active = np.zeros((b, int(np.ceil(horizon_days)) + 1), bool)
        self.day_active[:, 0] = True
        self.retained = np.zeros(b, bool)
        self.last_day = np.zeros(b)
        self.gap_sum = np.zeros(b)

    @property
    def done(self) -> bool:
        return not bool(self.active.any())

    def update(self, info: dict[str, Array], terminated: Array, truncated: Array, rows: Array | None = None) -> None:
        """Folds one step. ``info`` is the step's info (day is read *after* the step, as reported).
        ``rows``: the users the arrays belong to when the simulator retired the others
        (``FeedSimulator.uid``); None = all B users."""
        if rows is not None:
            b, n = self.active.shape[0], len(rows)
            info = {k: _scatter(v, rows, b) for k, v in info.items() if isinstance(v, np.ndarray) and v.shape == (n,)}
            terminated, truncated = _scatter(terminated, rows, b), _scatter(truncated, rows, b)
        a = self.active
        for k in _SUMS:
            self.sums[k] += np.where(a, info[k], 0.0)
        self.steps += a
        watch = np.where(a, info["engagement/watch_s"], 0.0)
        # The day of the session this step served: the day before the step's return moved the clock.
        returned = a & (info["retention/returned"] > 0)
        day_now = info["retention/day"]
        served_day = np.where(returned, self.last_day, day_now)
        self.first_day_watch_s += np.where(served_day < 1.0, watch, 0.0)
        self.first_session_watch_s += np.where(self.in_first_session, watch, 0.0)
        self.in_first_session &= ~(info["retention/session_end"] > 0)
        self.sessions += returned
        self.gap_sum += np.where(returned, info["retention/gap_days"], 0.0)
        d = np.minimum(day_now.astype(np.int64), self.day_active.shape[1] - 1)
        r = np.flatnonzero(returned)
        self.day_active[r, d[r]] = True
        self.last_day = np.where(a, day_now, self.last_day)
        done = terminated | truncated
        self.retained |= a & truncated & ~terminated
        self.active = a & ~done

    def per_user(self) -> dict[str, Array]:
        """(B,) float64 per metric in ``DEFINITIONS``."""
        s = self.sums
        v = np.maximum(s["engagement/videos"], 1.0)
        days = np.maximum(np.minimum(self.last_day, self.horizon_days), 1.0)
        return {
            "retention/retained_30d": self.retained.astype(np.float64),
            "retention/day1_return": self.day_active[:, min(1, self.day_active.shape[1] - 1)].astype(np.float64),
            "retention/day7_return": self.day_active[:, min(7, self.day_active.shape[1] - 1)].astype(np.float64),
            "retention/sessions_per_day": self.sessions / days,
            "retention/active_days": self.day_active.sum(axis=1).astype(np.float64),
            "retention/mean_return_gap_days": np.where(
                self.sessions > 1, self.gap_sum / np.maximum(self.sessions - 1, 1), self.horizon_days),
            "engagement/session_minutes": s["engagement/watch_s"] / 60.0 / self.sessions,
            "engagement/session_videos": s["engagement/videos"] / self.sessions,
            "engagement/watch_s_per_video": s["engagement/watch_s"] / v,
            "engagement/first_day_watch_minutes": self.first_day_watch_s / 60.0,
            "engagement/first_session_watch_minutes": self.first_session_watch_s / 60.0,
            "engagement/watch_minutes": s["engagement/watch_s"] / 60.0,
            "engagement/like_rate": s["engagement/likes"] / v,
            "engagement/share_rate": s["engagement/shares"] / v,
            "engagement/comment_rate": s["engagement/comments"] / v,
            "engagement/follow_rate": s["engagement/follows"] / v,
            "engagement/skip_rate": s["engagement/skips"] / v,
            "engagement/complete_rate": s["engagement/completes"] / v,
            "engagement/regret_rate": s["engagement/regrets"] / v,
            "engagement/harmful_rate": s["engagement/harmful"] / v,
            "creators/new_creator_share": s["creators/new_creator_impressions"] / v,
            "creators/new_creator_follows": 1000.0 * s["creators/new_creator_follows"] / v,
            "creators/new_creator_follow_conversion": s["creators/new_creator_follows"]
            / np.maximum(s["creators/new_creator_impressions"], 1.0),
            "slate/topic_entropy": s["slate/topic_entropy"] / np.maximum(self.steps, 1.0),
            "slate/intra_list_distance": s["slate/intra_list_distance"] / np.maximum(self.steps, 1.0),
            "slate/ad_load": s["slate/ads"] / np.maximum(s["slate/ads"] + s["engagement/videos"], 1.0),
            "integrity/boosted_share": s["integrity/boosted_impressions"] / v,
            "integrity/boosted_trending_share": s["integrity/boosted_trending_impressions"]
            / np.maximum(s["integrity/trending_impressions"], 1.0),
        }
