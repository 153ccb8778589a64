"""Arrays that pass between the world and the pipeline, and between the pipeline's stages.

Dimension letters: B users, N items (capacity), C candidates, P pool items, F feed items, S slate
size, K ranker heads, D embedding dims, T topics. Ids are int32, ``-1`` is padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Array = np.ndarray


#: User-candidate rows a batched model pass handles at once. Stages 2-3 score (B', C) candidates a
#: request; done in one pass, their (B' x C, width) intermediates are tens of MB each and every call
#: page-faults fresh memory, which cost more than the arithmetic (measured: the multi-task ranker on
#: 212 users x 500 candidates took 174 ms whole, 77 ms in blocks of 8 users, bit for bit the same).
ROW_BLOCK = 8192


def user_blocks(n_users: int, n_candidates: int, rows: int | None = None) -> list[slice]:
    """Slices of ``range(n_users)`` holding about ``rows`` (default :data:`ROW_BLOCK`) user-candidate rows
    each, at least one user, for scoring (B', C) candidates block by block."""
    step = max(1, (ROW_BLOCK if rows is None else rows) // max(n_candidates, 1))
    return [slice(s, min(s + step, n_users)) for s in range(0, n_users, step)]


def distinct_ids(ids: Array, n: int) -> tuple[Array, Array]:
    """Ids in ``[0, n)`` -> (sorted distinct ids, int64 position of each id among them, ``ids``' shape): by
    a table over ``n`` when that is not much larger than ``ids``, else by sorting."""
    flat = ids.reshape(-1)
    if n > 8 * flat.size:
        uniq, where = np.unique(flat, return_inverse=True)
        return uniq, where.reshape(ids.shape).astype(np.int64)
    seen = np.zeros(n, bool)
    seen[flat] = True
    uniq = np.flatnonzero(seen)
    pos = np.empty(n, np.int64)
    pos[uniq] = np.arange(uniq.size)
    return uniq, pos.take(ids)


def take_rows(obj: object, names: tuple[str, ...], rows: Array) -> None:
    """Keeps only ``rows`` of the per-user arrays ``names`` of ``obj`` (first axis = users), in place of
    the attributes: how a batch drops users whose episodes ended (``FeedSimulator.retire``)."""
    for name in names:
        setattr(obj, name, getattr(obj, name)[rows])


@dataclass
class Catalog:
    """What a production system can observe about the corpus. The world updates it in place.

    Nothing here is hidden truth: embeddings are a content-understanding model's output,
    quality and risk are model estimates, counters are logged engagement.
    """

    n_items: int
    """Number of items uploaded so far (ids ``0 .. n_items-1`` are valid)."""
    n_topics: int
    n_formats: int
    emb: Array  # (N, D) float32, L2-normalised content embedding (system's view)
    topic: Array  # (N,) int32 topic label
    creator: Array  # (N,) int32 creator id
    format: Array  # (N,) int8 format id
    duration_s: Array  # (N,) float32
    upload_day: Array  # (N,) float32, world day of upload
    quality_est: Array  # (N,) float32, content-quality model estimate in [0, 1]
    risk_est: Array  # (N,) float32, moderation model's brand-safety risk estimate in [0, 1]
    promoted: Array  # (N,) bool, sponsored/promoted content
    impressions: Array  # (N,) float32 logged counters ...
    completes: Array  # (N,) float32
    likes: Array  # (N,) float32
    shares: Array  # (N,) float32
    skips: Array  # (N,) float32
    velocity: Array  # (N,) float32, exponentially decayed recent engagement (trending signal)
    creator_followers: Array  # (n_creators,) float32
    creator_start_day: Array  # (n_creators,) float32
    creator_recent: Array  # (n_creators, M) int32 ring buffer of recent uploads, -1 = empty
    ad_emb: Array  # (n_ads, D) float32
    world_day: float = 0.0
    new_creator_days: float = 30.0
    new_creator_followers: float = 1000.0
    region: Array | None = None  # (N,) int16 the creator's region (metadata), in worlds with regions or languages
    language: Array | None = None  # (N,) int16 the video's language
    velocity_region: Array | None = None  # (R, N) float32 the engagement velocity among each region's users

    @property
    def n_creators(self) -> int:
        return int(self.creator_followers.shape[0])

    def new_creator_mask(self) -> Array:
        """(n_creators,) bool: the seed's "new creator" (< 30 days or < 1000 followers)."""
        age = self.world_day - self.creator_start_day
        return (age < self.new_creator_days) | (self.creator_followers < self.new_creator_followers)

    def item_is_new_creator(self, item: Array) -> Array:
        """Same shape as ``item`` (int32 ids, -1 padding): True where the item's creator is new."""
        new = self.new_creator_mask()
        safe = np.where(item >= 0, item, 0)
        return new[self.creator[safe]] & (item >= 0)


@dataclass
class Pool:
    """The ranked pool from stages 1-3, reused across requests until it runs low (B, P)."""

    item: Array  # (B, P) int32, -1 = consumed or empty
    heads: Array  # (B, P, K) float32 predicted head values (watch_time in scale units)
    uncertainty: Array  # (B, P) float32 std of the weighted score
    topic: Array  # (B, P) int32
    creator: Array  # (B, P) int32
    format: Array  # (B, P) int8
    new_creator: Array  # (B, P) bool
    quality_est: Array  # (B, P) float32
    source: Array  # (B, P) int8 stage-1 source id (see ``sourcing.SOURCES``)

    def take(self, rows: Array) -> None:
        """Keeps only the pools of ``rows``."""
        take_rows(self, tuple(self.__dataclass_fields__), rows)

    def remaining(self) -> Array:
        """(B,) int: items left in each user's pool."""
        return (self.item >= 0).sum(axis=1)


@dataclass
class Feed:
    """Stage 4's output for one request: the first F positions of the planned feed (F = ``feed_size``, or
    ``slate_size`` in the simulator, whose requests serve no more than that before the feed is re-planned)."""

    item: Array  # (B, F) int32 final organic feed, -1 = could not fill
    pool_index: Array  # (B, F) int32 index into the pool, -1 = none
    score: Array  # (B, F) float32 the score the item was placed by
    explore: Array  # (B, F) bool placed in an explore slot (Thompson sample)
    reserved_new: Array  # (B, F) bool placed in a reserved new-creator slot
    rule_relaxed: Array  # (B,) int32 placements where a hard rule had to be relaxed (+ count rules unmet, whole feeds)
    diverted: Array  # (B, F) bool an exploit slot whose item is not the best remaining by score: a diversity rule or
    # the topic penalty put it there


@dataclass
class Slate:
    """What is shown for one request: organic items interleaved with business insertions."""

    item: Array  # (B, S) int32 video id (organic or promoted); -1 for an ad slot
    ad: Array  # (B, S) int32 ad id, -1 for a video slot
    promoted: Array  # (B, S) bool
    feed_pos: Array  # (B, S) int32 index into Feed of the organic item, -1 for insertions
    explore: Array  # (B, S) bool
    reserved_new: Array  # (B, S) bool
    break_prompt: Array  # (B,) bool a take-a-break prompt is shown with this slate
    source: Array  # (B, S) int8 stage-1 source that retrieved the item (rankers.sourcing.SRC_*), -1 = none
    reason: Array  # (B, S) int8 why the slot holds it (rankers.explain.REASONS)
    top_head: Array  # (B, S) int8 the head whose weighted value added most to the item's score, -1 = none


@dataclass
class Feedback:
    """What the system observes after a slate (B, S): the client's engagement events."""

    shown: Array  # (B, S) bool the user reached this position
    watch_s: Array  # (B, S) float32
    watch_frac: Array  # (B, S) float32
    complete: Array  # (B, S) bool
    like: Array  # (B, S) bool
    share: Array  # (B, S) bool
    comment: Array  # (B, S) bool
    follow: Array  # (B, S) bool
    skip: Array  # (B, S) bool
    not_interested: Array  # (B, S) bool
    regret: Array  # (B, S) bool survey-reported regret (the label the p_regret head learns from)
    mute_topic: Array | None = None  # (B, S) bool the user muted this video's topic (a user control)
    mute_creator: Array | None = None  # (B, S) bool the user muted this video's creator
