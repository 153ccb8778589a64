"""Impression rows, the learned models' training data, and their labels.

Training functions (:mod:`rankers.training`) take *impression rows*: a dict of numpy arrays, one entry per
logged impression (I rows). Nothing here loads files of the offline-data package or touches the world: a
caller turns its logs into rows (:mod:`offline_data.ranker_rows` for the simulator's logs,
:func:`rankers.kuairand.load_kuairand` for KuaiRand-Pure). Row keys:

- ``user_id`` (I,) int64, ``step`` (I,) int (request index; orders rows in time);
- every key of the raw feature dict of :mod:`rankers.models` (:data:`ROW_FEATURE_KEYS`), one entry
  per row (``item_emb`` and ``user_emb`` (I, E)), as the system saw them when serving;
- labels ``watch_s``, ``watch_frac`` (I,) float and ``complete``, ``like``, ``share``, ``comment``,
  ``follow``, ``skip``, ``regret`` (I,) bool."""

from __future__ import annotations

import numpy as np

from rankers.config import HEAD_INDEX, HEADS
from rankers.models import (
    ITEM_KEYS,
    USER_KEYS,
)
from rankers.types import Array

ROW_FEATURE_KEYS: tuple[str, ...] = (*USER_KEYS, *ITEM_KEYS)
LABEL_KEYS: tuple[str, ...] = ("watch_s", "watch_frac", "complete", "like", "share", "comment", "follow", "skip",
                               "regret")
REQUIRED_ROW_KEYS: tuple[str, ...] = ("user_id", "step", *ROW_FEATURE_KEYS, *LABEL_KEYS)
#: Label of each head in :data:`HEADS` order (watch_time = watch_s / watch_time_scale_s).
HEAD_LABEL: dict[str, str] = {"p_complete": "complete", "p_like": "like", "p_share": "share", "p_comment": "comment",
                              "p_follow": "follow", "watch_time": "watch_s", "p_skip": "skip", "p_regret": "regret"}


def validate_rows(rows: dict[str, Array]) -> int:
    """Checks that ``rows`` has every required key with one entry per row; returns I.

    Raises:
        ValueError: naming the missing keys, or the key whose length differs.
    """
    missing = [k for k in REQUIRED_ROW_KEYS if k not in rows]
    if missing:
        raise ValueError(f"impression rows lack required keys {missing}")
    n = len(rows["user_id"])
    for k in REQUIRED_ROW_KEYS:
        if len(rows[k]) != n:
            raise ValueError(f"impression rows key {k!r} has {len(rows[k])} entries, expected {n} (as user_id)")
    return n


def head_labels(rows: dict[str, Array], watch_time_scale_s: float) -> Array:
    """(I, K) float32 targets in :data:`HEADS` order; watch_time in ``watch_time_scale_s`` units."""
    y = np.stack([np.asarray(rows[HEAD_LABEL[h]], np.float32) for h in HEADS], axis=1)
    y[:, HEAD_INDEX["watch_time"]] /= watch_time_scale_s
    return y


def engaged_label(rows: dict[str, Array]) -> Array:
    """(I,) bool: the two-tower's positive engagement (complete, like, share, follow or > 50 % watched)."""
    return (np.asarray(rows["complete"], bool) | np.asarray(rows["like"], bool) | np.asarray(rows["share"], bool)
            | np.asarray(rows["follow"], bool) | (np.asarray(rows["watch_frac"]) > 0.5))


def split_rows_by_user(user_id: Array, val_fraction: float = 0.2, seed: int = 0) -> tuple[Array, Array]:
    """Row indices (train, val): a seeded ``val_fraction`` of the distinct users goes to val."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    users = np.unique(np.asarray(user_id))
    rng = np.random.default_rng(seed)
    n_val = max(1, round(val_fraction * users.size)) if users.size > 1 else 0
    val_users = rng.choice(users, n_val, replace=False) if n_val else users[:0]
    val = np.isin(user_id, val_users)
    return np.flatnonzero(~val), np.flatnonzero(val)


def split_by_time(step: Array, val_fraction: float = 0.2) -> tuple[Array, Array]:
    """Row indices (train, val): rows at or after the ``1 - val_fraction`` quantile of ``step`` go to val
    (train on the past, evaluate on the future)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} is invalid: must be in (0, 1)")
    s = np.asarray(step)
    cut = np.quantile(s, 1.0 - val_fraction, method="higher")
    val = s >= cut
    return np.flatnonzero(~val), np.flatnonzero(val)


def session_counts(session_id: Array, step: Array, topic: Array, watch_frac: Array, engaged_frac: float = 0.5,
                   skipped_frac: float = 0.1) -> tuple[Array, Array, Array]:
    """Within-session counts each row's request saw, from rows of strictly earlier steps of the same session.

    Args:
        session_id: (I,) int, unique per (user, session).
        step: (I,) int request index (rows of one request share it).
        topic: (I,) int topic of the row's video.
        watch_frac: (I,) float watched fraction.

    Returns:
        ``(engaged, skipped, videos)`` (I,) float32: videos of the row's topic engaged (watch_frac >
        ``engaged_frac``) and skipped (< ``skipped_frac``) earlier in the session, and all videos
        shown earlier in the session: what :class:`~rankers.user_model.UserView` keeps when serving.
    """
    sid = np.asarray(session_id, np.int64)
    st = np.asarray(step, np.int64)
    tp = np.asarray(topic, np.int64)
    wf = np.asarray(watch_frac, np.float64)
    s_span = int(st.max(initial=0)) + 2

    def before(group: Array, value: Array) -> Array:
        _, g = np.unique(group, return_inverse=True)
        key = g.astype(np.int64) * s_span + st
        order = np.argsort(key, kind="stable")
        ks = key[order]
        cum = np.r_[0.0, np.cumsum(value[order])]
        lo = np.searchsorted(ks, g * s_span, side="left")
        hi = np.searchsorted(ks, key, side="left")  # rows of earlier steps only
        return (cum[hi] - cum[lo]).astype(np.float32)

    n_topics = int(tp.max(initial=0)) + 1
    st_key = sid * n_topics + tp
    eng = before(st_key, (wf > engaged_frac).astype(np.float64))
    skp = before(st_key, (wf < skipped_frac).astype(np.float64))
    vids = before(sid, np.ones_like(wf))
    return eng, skp, vids

