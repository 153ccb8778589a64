"""Logged requests -> the impression rows the learned models train on (:mod:`rankers.labels`), with the
features the system saw when serving: the data part of provisioning the learned rankers
(:mod:`offline_data.provision`), shared with ``scripts/train_rankers.py``."""

from __future__ import annotations

from typing import Any

import numpy as np

from envs.config import FeedConfig
from envs.learned import logging_config
from envs.observation import ObservationLayout
from envs.simulator import world_corpus
from offline_data.collect import collect
from offline_data.policies import GaussianKnobs
from rankers.labels import session_counts
from rankers.types import Array, Catalog


def catalog_snapshot(cfg: FeedConfig, seed: int) -> Catalog:
    """The world's observable catalog at the start of collection on ``seed`` (content-model outputs:
    embedding, quality and risk estimates, fixed at upload)."""
    return world_corpus(logging_config(cfg), seed).catalog


def rows_from_dataset(ds: Any, cfg: FeedConfig, cat: Catalog) -> dict[str, Array]:
    """Impression rows of a logged dataset (``offline_data``) with the serving-time features.

    Per row: the logged item features and user estimate, the user context read from the logged
    observation of the request (cold flag, session minutes and videos, recent rates), the within-session
    topic counts reconstructed from earlier requests of the session (as ``UserView`` keeps them), and the
    content-model outputs (embedding, quality, risk) joined by video id from the catalog snapshot ``cat``
    (videos uploaded after the snapshot get zeros there)."""
    imp, tr = ds.impressions, ds.transitions
    lay = ObservationLayout(cfg)
    obs = tr.observations
    sess_start = (obs[:, lay["session.videos"]][:, 0] == 0) | np.r_[True, tr.episode_id[1:] != tr.episode_id[:-1]]
    sid_tr = np.cumsum(sess_start) - 1
    ti = imp.transition_index
    o = obs[ti]
    p = cfg.pipeline
    eng, skp, _ = session_counts(sid_tr[ti], imp.step, imp.topic, imp.watch_frac, p.engaged_watch_frac,
                                 p.skipped_watch_frac)
    vid = imp.video_id.astype(np.int64)
    snap_ok = vid < cat.n_items
    safe = np.where(snap_ok, vid, 0)
    rows: dict[str, Array] = {k: getattr(imp, k) for k in imp.__dataclass_fields__}
    rows.update({
        "video_id": vid, "session_id": sid_tr[ti],
        "cold": o[:, lay["user.cold_start"]][:, 0], "session_minutes": o[:, lay["session.minutes"]][:, 0] * 60.0,
        "session_videos": o[:, lay["session.videos"]][:, 0] * 100.0, "rates": o[:, lay["user.recent_rates"]],
        "sess_topic_engaged": eng, "sess_topic_skipped": skp,
        "item_emb": np.where(snap_ok[:, None], cat.emb[safe], 0.0).astype(np.float32),
        "quality_est": np.where(snap_ok, cat.quality_est[safe], 0.5).astype(np.float32),
        "risk_est": np.where(snap_ok, cat.risk_est[safe], 0.0).astype(np.float32),
        "new_creator": imp.new_creator.astype(np.float32), "promoted": imp.promoted.astype(np.float32),
    })
    return rows


def dataset_rows(ds: Any, cfg: FeedConfig, seed: int) -> tuple[dict[str, Array], int]:
    """Rows of a logged dataset collected on ``seed`` and how many of its videos were uploaded after
    the catalog snapshot (they have no content features in the rows)."""
    worlds = ds.meta.get("collection", {}).get("worlds", 1)
    if worlds != 1:
        raise ValueError(f"ranker training rows join videos to one world's catalog; this log was collected on {worlds} "
                         "worlds (collect(worlds=K), video ids are per world): collect it with worlds=1")
    cat = catalog_snapshot(cfg, seed)
    rows = rows_from_dataset(ds, cfg, cat)
    return rows, int((rows["video_id"] >= cat.n_items).sum())


def collect_rows(cfg: FeedConfig, users: int, steps: int, sigma: float, seed: int, progress: bool = True,
                 ) -> tuple[dict[str, Array], dict[str, Any]]:
    """Logs ``users`` x ``steps`` requests of the weighted-sum knobs with truncated-normal noise ``sigma``
    (served by :func:`logging_config` of ``cfg``) and returns the impression rows and a description."""
    log_cfg = logging_config(cfg)
    ds = collect(GaussianKnobs(sigma), log_cfg, n_users=users, n_steps=steps, seed=seed, progress=progress)
    rows, late = dataset_rows(ds, log_cfg, seed)
    src = {"source": "collected", "behaviour": f"GaussianKnobs({sigma})", "users": users, "steps": steps,
           "seed": seed, "videos_after_snapshot": late}
    return rows, src
