"""Segments of users by what the system observes, and the policy that serves one knob vector per segment.

A :class:`Segmenter` cuts the observation along named fields of the layout (``envs.observation``) at
thresholds given in native units (days, sessions a day, minutes), so a segment is something production
can tell apart: new vs established users, habitual vs occasional, broad vs focused taste, early vs late in
the session, users who take part (long-run like or share rate) vs users who watch, users who follow take-a-break
prompts vs users who ignore them. ``2 ** len(splits)`` segments; segment ``s`` has bit ``i`` set when split
``i``'s field is at or above its threshold. Segment-CEM (``agents.cem.cem_tune(segments=...)``) tunes one vector
per segment; :class:`SegmentKnobs` serves them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.policies import BasePolicy
from envs.observation import ObservationLayout
from rankers.config import N_KNOBS
from rankers.types import Array

if TYPE_CHECKING:
    from envs.simulator import FeedSimulator

#: field -> (layout field, native value -> observation value), the inverse of ``ObservationLayout.build``'s scaling.
FIELDS: dict[str, tuple[str, Callable[[float], float]]] = {
    "tenure_days": ("user.days_since_signup", lambda d: float(np.log1p(d) / 7.0)),
    "visits_per_day": ("user.visit_rate", lambda r: float(np.log1p(r))),
    "topic_entropy": ("user.topic_entropy", float),
    "session_minutes": ("session.minutes", lambda m: m / 60.0),
    "hours_since_last_visit": ("user.hours_since_last_visit", lambda h: float(np.log1p(h) / 7.0)),
    "like_rate": ("user.long_rate_like", float),
    "share_rate": ("user.long_rate_share", float),
    "break_take_rate": ("user.break_take_rate", float),
}

DEFAULT_SPLITS: tuple[tuple[str, float], ...] = (("tenure_days", 7.0), ("visits_per_day", 1.0),
                                                 ("topic_entropy", 0.2))
"""New (< 7 days since signup) vs established; occasional (< 1 observed session a day) vs habitual; focused
(history topic entropy < 0.2) vs broad."""


@dataclass(frozen=True)
class Segmenter:
    """Assigns each observation to one of ``2 ** len(splits)`` segments."""

    splits: tuple[tuple[str, float], ...] = DEFAULT_SPLITS

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("Segmenter needs at least one split (one segment = the constant vector: no segmenter)")
        for name, thr in self.splits:
            if name not in FIELDS:
                raise ValueError(f"unknown segment field {name!r}: choose from {sorted(FIELDS)}")
            if not np.isfinite(thr):
                raise ValueError(f"segment threshold of {name!r} must be finite, got {thr}")

    @property
    def n_segments(self) -> int:
        return 2 ** len(self.splits)

    def labels(self) -> list[str]:
        """One readable label per segment, e.g. ``tenure_days>=7,visits_per_day<1,topic_entropy>=0.45``."""
        return [",".join(f"{n}{'>=' if s >> i & 1 else '<'}{t:g}" for i, (n, t) in enumerate(self.splits))
                for s in range(self.n_segments)]

    def assign(self, obs: Array, layout: ObservationLayout) -> Array:
        """(B,) int64 segment of each row of ``obs`` (B, D)."""
        seg = np.zeros(obs.shape[0], np.int64)
        for i, (name, thr) in enumerate(self.splits):
            field, scale = FIELDS[name]
            seg |= (obs[:, layout[field]][:, 0] >= np.float32(scale(thr))).astype(np.int64) << i
        return seg

    def to_json(self) -> list[list[Any]]:
        return [[n, float(t)] for n, t in self.splits]


class SegmentKnobs(BasePolicy):
    """One constant knob vector per observed segment: ``table[segment(obs)]``."""

    def __init__(self, table: Array, segmenter: Segmenter, name: str = "segment_cem") -> None:
        t = np.asarray(table, np.float32)
        if t.shape != (segmenter.n_segments, N_KNOBS) or not np.all(np.isfinite(t)):
            raise ValueError(f"SegmentKnobs needs a finite ({segmenter.n_segments}, {N_KNOBS}) table, got {t.shape}")
        self.table = np.clip(t, -1.0, 1.0)
        self.segmenter = segmenter
        self.name = name
        self.layout: ObservationLayout | None = None

    def bind(self, sim: FeedSimulator) -> None:
        self.sim = sim
        self.layout = sim.layout

    def act(self, obs: Array) -> Array:
        if self.layout is None:
            raise RuntimeError("SegmentKnobs.act before bind(sim): it needs the simulator's observation layout")
        return self.table[self.segmenter.assign(obs, self.layout)]

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "table": self.table.tolist(), "splits": self.segmenter.to_json()}


def segment_shares(segs: Sequence[Array], n_segments: int) -> Array:
    """(S,) share of rows in each segment over the arrays ``segs``."""
    counts = sum(np.bincount(s, minlength=n_segments) for s in segs)
    return np.asarray(counts, np.float64) / max(float(np.sum(counts)), 1.0)
