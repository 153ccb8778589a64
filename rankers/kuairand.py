"""Interaction logs in KuaiRand-Pure's published schema -> impression rows (:mod:`rankers.labels`) for training.

KuaiRand (Gao et al., CIKM 2022) logs a short-video app's exposures with their feedback. This module
reads a CSV of its interaction log (``log_standard_*.csv`` / ``log_random_*.csv`` of KuaiRand-Pure,
or a file written in that schema) and converts it to the row dict the training functions take.
Nothing is downloaded: a researcher who has the dataset passes its path.

Required columns (:data:`KUAIRAND_COLUMNS`): user_id, video_id, date, hourmin, time_ms, is_click,
is_like, is_follow, is_comment, is_forward, is_hate, long_view, play_time_ms, duration_ms,
profile_stay_time, comment_stay_time, is_profile_enter, is_rand, tab. A file without some of them
raises :class:`KuaiRandSchemaError` naming them.

Mapping (one row per logged exposure, sorted by user, then ``time_ms``):

========================  ================================================================================
row key                   from KuaiRand
========================  ================================================================================
user_id, video_id         user_id, video_id
step                      rank of the exposure within the user's log by ``time_ms`` (0, 1, ...)
position                  0 (KuaiRand logs exposures, not slates)
episode_id                user_id (one episode per user)
session_id                a new session after a gap of more than ``session_gap_min`` minutes
watch_s                   play_time_ms / 1000
watch_frac                clip(play_time_ms / duration_ms, 0, 1) (0 where duration_ms <= 0)
complete                  play_time_ms >= 0.8 * duration_ms (and duration_ms > 0): the seed's "> 80 %"
like / share              is_like / is_forward
comment / follow          is_comment / is_follow
skip                      play_time_ms < 2000: the seed's "swipes away in < 2 s"
regret, not_interested    is_hate (KuaiRand's explicit negative feedback stands for both)
duration_s                duration_ms / 1000
impressions               exposures of the video earlier in this log (the logged counter before the request)
explore                   is_rand (exposed by KuaiRand's random-exposure intervention)
topic                     ``topics[video_id]`` when a mapping is given (e.g. the first tag of
                          video_features_basic), else 0
format, new_creator,      0 (not in the interaction log)
promoted
quality_est, risk_est     0.5 and 0.0 (no content model in the log)
user_emb, item_emb        zeros (I, emb_dim): the log carries no content embedding; id embeddings carry
                          the collaborative signal (a caller may overwrite them with its own)
cold                      fewer than 20 earlier exposures of the user in this log
session_minutes           minutes watched earlier in the session (sum of (play_time_s + 1) / 60)
session_videos            exposures earlier in the session
sess_topic_engaged /      exposures of the row's topic earlier in the session with watch_frac > 0.5 / < 0.1
sess_topic_skipped
rates (I, 7)              the user's earlier rates of like, complete, skip, share, follow, not_interested and
                          watch_frac (RATE_NAMES order): a running mean shrunk toward the simulator's prior
                          with weight ``rate_prior_weight`` exposures
========================  ================================================================================

Kept as extra row keys, unused by the models: is_click (``click``), long_view, is_profile_enter
(``profile_enter``), profile_stay_time, comment_stay_time, tab, date, hourmin, time_ms.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rankers.labels import session_counts
from rankers.types import Array

KUAIRAND_COLUMNS: tuple[str, ...] = (
    "user_id", "video_id", "date", "hourmin", "time_ms", "is_click", "is_like", "is_follow", "is_comment",
    "is_forward", "is_hate", "long_view", "play_time_ms", "duration_ms", "profile_stay_time", "comment_stay_time",
    "is_profile_enter", "is_rand", "tab",
)
#: Prior of the running rates (the simulator's ``UserView`` prior, RATE_NAMES order).
RATE_PRIOR: tuple[float, ...] = (0.05, 0.3, 0.3, 0.01, 0.005, 0.01, 0.4)


class KuaiRandSchemaError(ValueError):
    """The file is not in KuaiRand-Pure's interaction-log schema; the message names the missing columns."""


def _before_in_group(group: Array, value: Array) -> Array:
    """Sum of ``value`` over earlier rows of the same ``group`` (rows already sorted by group, then time)."""
    cum = np.cumsum(value, dtype=np.float64) - value
    start = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    first = np.repeat(start, np.diff(np.r_[start, group.size]))
    return cum - cum[first]


REQUIRED_VALUES: tuple[str, ...] = ("user_id", "video_id", "time_ms", "play_time_ms", "duration_ms")
"""Columns every row must fill: an empty one is refused (elsewhere an empty cell counts as 0)."""


def _numeric(df: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The columns as numbers. A cell that is not a number, or an empty cell of :data:`REQUIRED_VALUES` (a
    row without a user would have become user 0), raises :class:`KuaiRandSchemaError` naming the column and
    the file's line."""
    out = {}
    for c in df.columns:
        if pd.api.types.is_numeric_dtype(df[c]):  # pandas parsed every cell as a number (empty ones as NaN)
            num = df[c]
            text = pd.Series(False, index=df.index)
        else:
            num = pd.to_numeric(df[c], errors="coerce")
            text = num.isna() & df[c].notna()
        if text.any():
            i = int(np.flatnonzero(text.to_numpy())[0])
            raise KuaiRandSchemaError(f"{path}: column {c!r} holds {df[c].iloc[i]!r} on line {i + 2}, not a number")
        if c in REQUIRED_VALUES and num.isna().any():
            i = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise KuaiRandSchemaError(f"{path}: column {c!r} is empty on line {i + 2}; every row needs "
                                      f"{list(REQUIRED_VALUES)}")
        out[c] = num
    return pd.DataFrame(out)


def load_kuairand(path: str | Path, *, emb_dim: int = 8, topics: dict[int, int] | None = None,
                  session_gap_min: float = 30.0, rate_prior_weight: float = 20.0,
                  nrows: int | None = None) -> dict[str, Array]:
    """Reads a KuaiRand-Pure interaction log (CSV) into impression rows (see the module docstring).

    Args:
        path: CSV file with the columns of :data:`KUAIRAND_COLUMNS` (others are ignored).
        emb_dim: E of the zero ``user_emb`` / ``item_emb`` columns.
        topics: optional video_id -> topic id (ids >= 0); unmapped videos get topic 0.
        session_gap_min: a gap longer than this between two exposures of a user starts a session.
        rate_prior_weight: pseudo-exposures of the rate prior.
        nrows: read only the first ``nrows`` rows.

    Returns:
        dict of (I,) arrays (``user_emb``, ``item_emb``, ``rates`` are 2-D), sorted by user and time.

    Raises:
        KuaiRandSchemaError: the file lacks required columns (named in the message).
    """
    path = Path(path)
    try:
        head = pd.read_csv(path, nrows=0)
    except pd.errors.EmptyDataError:
        raise KuaiRandSchemaError(f"{path}: empty file (no header row of KuaiRand-Pure's columns)") from None
    missing = [c for c in KUAIRAND_COLUMNS if c not in head.columns]
    if missing:
        raise KuaiRandSchemaError(f"{path}: not in KuaiRand-Pure's log schema, missing columns {missing}")
    df = pd.read_csv(path, usecols=list(KUAIRAND_COLUMNS), nrows=nrows)
    if df.empty:
        raise KuaiRandSchemaError(f"{path}: no rows under the header")
    df = _numeric(df, path)
    df = df.sort_values(["user_id", "time_ms"], kind="stable").reset_index(drop=True)
    n = len(df)

    def col(name: str, dtype: type = np.float64) -> Array:
        return df[name].fillna(0).to_numpy(dtype)

    user = col("user_id", np.int64)
    video = col("video_id", np.int64)
    t_ms = col("time_ms")
    play = np.maximum(col("play_time_ms"), 0.0)
    dur = col("duration_ms")
    watch_frac = np.where(dur > 0, np.clip(play / np.where(dur > 0, dur, 1.0), 0.0, 1.0), 0.0)
    complete = (dur > 0) & (play >= 0.8 * dur)
    like, share = col("is_like") > 0, col("is_forward") > 0
    comment, follow = col("is_comment") > 0, col("is_follow") > 0
    skip = play < 2000.0
    hate = col("is_hate") > 0
    # time order within user: step, sessions
    step = np.arange(n) - np.repeat(*_group_starts(user))
    gap = np.r_[np.inf, np.diff(t_ms)]
    new_session = (gap > session_gap_min * 60_000.0) | np.r_[True, user[1:] != user[:-1]]
    session_id = np.cumsum(new_session) - 1
    topic = np.array([topics.get(int(v), 0) for v in video], np.int64) if topics else np.zeros(n, np.int64)
    eng, skp, videos = session_counts(session_id, step, topic, watch_frac)
    minutes = _before_in_group(session_id, (play / 1000.0 + 1.0) / 60.0)
    # the video's exposures earlier in this log (the logged counter), in global time order
    t_order = np.lexsort((np.arange(n), t_ms))
    imp = np.empty(n, np.float64)
    v_sorted = video[t_order]
    o2 = np.argsort(v_sorted, kind="stable")
    imp_sorted = np.empty(n, np.float64)
    imp_sorted[o2] = _before_in_group(v_sorted[o2], np.ones(n))
    imp[t_order] = imp_sorted
    obs = np.stack([like, complete, skip, share, follow, hate, watch_frac], axis=1).astype(np.float64)
    n_before = step.astype(np.float64)
    prior = np.asarray(RATE_PRIOR)
    sums = np.stack([_before_in_group(user, obs[:, j]) for j in range(obs.shape[1])], axis=1)
    rates = (prior[None, :] * rate_prior_weight + sums) / (rate_prior_weight + n_before[:, None])
    zeros = np.zeros(n, np.float32)
    return {
        "user_id": user, "video_id": video.astype(np.int64), "episode_id": user.copy(), "step": step.astype(np.int32),
        "position": np.zeros(n, np.int32), "session_id": session_id.astype(np.int64),
        "watch_s": (play / 1000.0).astype(np.float32), "watch_frac": watch_frac.astype(np.float32),
        "complete": complete, "like": like, "share": share, "comment": comment, "follow": follow, "skip": skip,
        "regret": hate.copy(), "not_interested": hate,
        "topic": topic.astype(np.int32), "format": np.zeros(n, np.int8),
        "duration_s": (dur / 1000.0).astype(np.float32),
        "impressions": imp.astype(np.float32), "new_creator": np.zeros(n, bool), "explore": col("is_rand") > 0,
        "promoted": np.zeros(n, bool), "quality_est": np.full(n, 0.5, np.float32), "risk_est": zeros.copy(),
        "user_emb": np.zeros((n, emb_dim), np.float32), "item_emb": np.zeros((n, emb_dim), np.float32),
        "cold": (step < 20).astype(np.float32), "session_minutes": minutes.astype(np.float32),
        "session_videos": videos, "sess_topic_engaged": eng, "sess_topic_skipped": skp,
        "rates": rates.astype(np.float32),
        "click": col("is_click") > 0, "long_view": col("long_view") > 0, "profile_enter": col("is_profile_enter") > 0,
        "profile_stay_time": col("profile_stay_time"), "comment_stay_time": col("comment_stay_time"),
        "tab": col("tab", np.int64), "date": col("date", np.int64), "hourmin": col("hourmin", np.int64),
        "time_ms": t_ms,
    }


def _group_starts(group: Array) -> tuple[Array, Array]:
    """For rows sorted by ``group``: (start index of each group, group sizes) for ``np.repeat``."""
    start = np.r_[0, np.flatnonzero(np.diff(group)) + 1]
    return start, np.diff(np.r_[start, group.size])
