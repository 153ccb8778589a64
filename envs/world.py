"""The hidden world: corpus, creators and their dynamics (batched, struct of arrays).

Everything here is ground truth the recommender never sees directly. The observable view of the
corpus is the :class:`rankers.types.Catalog` the world keeps up to date (content-model estimates
and logged counters only).
"""

from __future__ import annotations

import numpy as np

from envs.config import FeedConfig
from rankers.hashing import hash_u32, hash_uniform
from rankers.types import Array, Catalog

RECENT_PER_CREATOR = 8


def normalize_rows(x: Array) -> Array:
    """``x`` with each row (last axis) scaled to unit length (zero rows stay zero), as float32."""
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)).astype(np.float32)


class Corpus:
    """Videos, creators and ads. ``true_*`` arrays are hidden; ``catalog`` is what the system sees."""

    def __init__(self, cfg: FeedConfig, rng: np.random.Generator) -> None:
        c = cfg.corpus
        self.cfg = cfg
        self.rng = rng
        n0 = c.n_videos
        cap = n0 + int(np.ceil(n0 * c.upload_capacity))
        self.capacity = cap
        self.boost_days = np.zeros(cap, np.float32)  # hidden: days an engagement ring still inflates the item
        self.ever_boosted = np.zeros(cap, bool)  # hidden: the item was a ring's target
        d, t = c.emb_dim, c.n_topics
        self.topic_centre = normalize_rows(rng.standard_normal((t, d)))
        n_c = max(int(n0 / c.videos_per_creator), 1)
        # Creators: main topic, quality level, age, followers, upload rate.
        self.creator_topic = rng.integers(0, t, n_c).astype(np.int32)
        self.creator_quality = rng.beta(2.0, 2.0, n_c).astype(np.float32)
        self.creator_hook = rng.beta(1.0, 3.0, n_c).astype(np.float32)
        is_new = rng.random(n_c) < c.new_creator_share
        age = np.where(is_new, rng.uniform(0, c.new_creator_days, n_c), rng.uniform(c.new_creator_days, 1500, n_c))
        followers = np.where(is_new, rng.uniform(0, c.new_creator_followers, n_c),
                             np.exp(rng.normal(np.log(20_000), 1.5, n_c)))
        self.creator_base_rate = np.exp(rng.normal(0.0, 0.7, n_c)).astype(np.float32)
        self.creator_rate = self.creator_base_rate.copy()
        self.creator_last_view = np.zeros(n_c, np.float32)
        self.creator_uploads = np.zeros(n_c, np.int64)
        # Videos of the initial library, spread over creators by age and rate.
        w = np.sqrt(age + 5.0) * self.creator_base_rate
        creator = rng.choice(n_c, size=n0, p=w / w.sum()).astype(np.int32)
        self.n_items = n0
        self.true_emb = np.zeros((cap, d), np.float32)
        self.quality = np.zeros(cap, np.float32)
        self.hook = np.zeros(cap, np.float32)
        self.risk = np.zeros(cap, np.float32)
        self.trend = np.zeros(cap, np.float32)
        cat_arrays: dict[str, Array] = dict(
            emb=np.zeros((cap, d), np.float32), topic=np.zeros(cap, np.int32), creator=np.zeros(cap, np.int32),
            format=np.zeros(cap, np.int8), duration_s=np.ones(cap, np.float32), upload_day=np.zeros(cap, np.float32),
            quality_est=np.zeros(cap, np.float32), risk_est=np.ones(cap, np.float32), promoted=np.zeros(cap, bool),
            impressions=np.zeros(cap, np.float32), completes=np.zeros(cap, np.float32), likes=np.zeros(cap, np.float32),
            shares=np.zeros(cap, np.float32), skips=np.zeros(cap, np.float32), velocity=np.zeros(cap, np.float32),
        )
        self.catalog = Catalog(
            n_items=n0, n_topics=t, n_formats=c.n_formats, **cat_arrays,
            creator_followers=followers.astype(np.float32), creator_start_day=(-age).astype(np.float32),
            creator_recent=np.full((n_c, RECENT_PER_CREATOR), -1, np.int32),
            ad_emb=normalize_rows(rng.standard_normal((c.n_ads, d))), world_day=0.0,
            new_creator_days=c.new_creator_days, new_creator_followers=c.new_creator_followers,
        )
        self.ad_quality = rng.beta(2.0, 3.0, c.n_ads).astype(np.float32)
        # Regions and languages (CorpusConfig.n_regions): keyed draws, so the world's stream is the default one's.
        self.localized = c.n_regions > 1 or c.n_languages > 1
        cid = np.arange(n_c)
        self.creator_region = (hash_u32(cid, 211) % np.uint32(c.n_regions)).astype(np.int16)
        own = (self.creator_region % c.n_languages).astype(np.int16)
        other = (hash_u32(cid, 213) % np.uint32(c.n_languages)).astype(np.int16)
        self.creator_language = np.where(hash_uniform(cid, 212) < 0.85, own, other).astype(np.int16)
        regions = np.arange(c.n_regions)
        self.region_topics = np.stack([hash_u32(regions, 214) % np.uint32(t),
                                       hash_u32(regions, 215) % np.uint32(t)], axis=1).astype(np.int64)  # (R, 2)
        self.region_centre = normalize_rows(self.topic_centre[self.region_topics].mean(axis=1))  # (R, D)
        if self.localized:
            self.catalog.region = np.zeros(cap, np.int16)
            self.catalog.language = np.zeros(cap, np.int16)
            self.catalog.velocity_region = np.zeros((c.n_regions, cap), np.float32)
        ids = np.arange(n0)
        upload = -age[creator] * rng.random(n0)
        order = np.argsort(upload, kind="stable")  # older uploads first: ids follow upload time
        self._fill(ids, creator[order], upload[order].astype(np.float32))
        # Logged counters for the existing library: exposure grows with age and appeal.
        cat = self.catalog
        appeal = 0.5 * self.quality[:n0] + 0.5 * self.hook[:n0]
        est_fol = np.log1p(cat.creator_followers[cat.creator[:n0]])
        imp = np.exp(rng.normal(0.0, 1.0, n0)) * np.minimum(-cat.upload_day[:n0] + 0.5, 60.0) * (0.5 + appeal) * est_fol
        cat.impressions[:n0] = imp.astype(np.float32)
        base_c = 0.15 + 0.45 * self.quality[:n0]
        cat.completes[:n0] = imp * base_c
        cat.likes[:n0] = imp * 0.06 * (0.5 + self.quality[:n0])
        cat.shares[:n0] = imp * 0.01 * (0.3 + self.quality[:n0])
        cat.skips[:n0] = imp * (0.45 - 0.3 * appeal)
        self.recycle_ptr = 0
        self.recycled: list[Array] = []
        self._upload_acc = 0.0
        self._burst_acc = 0.0
        self._ring_acc = 0.0
        # The rings' own stream, spawned (not drawn) from the world's, so the world's stream is the same with or
        # without bots.
        self.bot_rng: np.random.Generator | None = None
        if c.bot_rings_per_day:
            seq = rng.bit_generator.seed_seq
            assert isinstance(seq, np.random.SeedSequence)
            self.bot_rng = np.random.default_rng(seq.spawn(1)[0])

    # ------------------------------------------------------------------ items
    def _fill(self, ids: Array, creator: Array, upload_day: Array) -> None:
        """Creates videos at ``ids`` for ``creator`` with hidden truth and observable estimates."""
        c, rng, cat = self.cfg.corpus, self.rng, self.catalog
        n = ids.size
        self.boost_days[ids] = 0.0
        self.ever_boosted[ids] = False
        if cat.region is not None and cat.language is not None and cat.velocity_region is not None:
            cat.region[ids] = self.creator_region[creator]
            cat.language[ids] = self.creator_language[creator]
            cat.velocity_region[:, ids] = 0.0
        d = c.emb_dim
        on_topic = rng.random(n) < 0.75
        topic = np.where(on_topic, self.creator_topic[creator], rng.integers(0, c.n_topics, n)).astype(np.int32)
        emb = normalize_rows(self.topic_centre[topic] + c.topic_spread * rng.standard_normal((n, d)) / np.sqrt(d) * 2.0)
        self.true_emb[ids] = emb
        self.quality[ids] = np.clip(self.creator_quality[creator] + 0.15 * rng.standard_normal(n), 0, 1)
        self.hook[ids] = np.clip(self.creator_hook[creator] + 0.1 * rng.standard_normal(n), 0, 1)
        self.risk[ids] = rng.beta(1.0, 12.0, n).astype(np.float32) + (rng.random(n) < 0.01) * 0.6
        self.trend[ids] = 0.0
        fmt = rng.integers(0, c.n_formats, n).astype(np.int8)
        dur = np.asarray(c.format_duration_s, np.float32)[fmt] * np.exp(0.3 * rng.standard_normal(n))
        cat.emb[ids] = normalize_rows(emb + c.estimate_noise * rng.standard_normal((n, d)).astype(np.float32))
        cat.topic[ids] = topic
        cat.creator[ids] = creator
        cat.format[ids] = fmt
        cat.duration_s[ids] = np.maximum(dur, 3.0)
        cat.upload_day[ids] = upload_day
        cat.quality_est[ids] = np.clip(self.quality[ids] + c.estimate_noise * 2 * rng.standard_normal(n), 0, 1)
        cat.risk_est[ids] = np.clip(self.risk[ids] + c.estimate_noise * rng.standard_normal(n), 0, 1)
        cat.promoted[ids] = rng.random(n) < c.promoted_share
        for arr in (cat.impressions, cat.completes, cat.likes, cat.shares, cat.skips, cat.velocity):
            arr[ids] = 0.0
        # newest uploads of each creator, ring of RECENT_PER_CREATOR (ids arrive in upload order)
        order = np.argsort(upload_day, kind="stable")
        rec = cat.creator_recent
        cr = creator[order]
        iid = ids[order].astype(np.int32)
        # vectorised ring insert: k-th upload of a creator in this batch goes to slot (count + k) % M
        srt = np.argsort(cr, kind="stable")
        cr_s, iid_s = cr[srt], iid[srt]
        first = np.r_[0, np.flatnonzero(np.diff(cr_s)) + 1]
        k = np.arange(cr_s.size) - np.repeat(first, np.diff(np.r_[first, cr_s.size]))
        rec[cr_s, (self.creator_uploads[cr_s] + k) % RECENT_PER_CREATOR] = iid_s
        np.add.at(self.creator_uploads, cr_s, 1)

    def upload(self, n: int, day: float) -> Array:
        """Adds ``n`` new videos by active creators (recycling the oldest slots when full)."""
        rate = self.creator_rate
        if n <= 0 or rate.sum() <= 0:
            return np.zeros(0, np.int32)
        creator = self.rng.choice(rate.size, size=n, p=rate / rate.sum()).astype(np.int32)
        free = self.capacity - self.n_items
        fresh = np.arange(self.n_items, self.n_items + min(n, free), dtype=np.int64)
        k = n - fresh.size
        old = (self.recycle_ptr + np.arange(k)) % self.capacity
        self.recycle_ptr = int((self.recycle_ptr + k) % self.capacity)
        if k:
            # a retired video leaves its creator's recent list
            rec = self.catalog.creator_recent
            rec[np.isin(rec, old)] = -1
            self.recycled.append(old.astype(np.int64))
        ids = np.concatenate([fresh, old]).astype(np.int64)
        self.n_items += fresh.size
        self.catalog.n_items = self.n_items
        self._fill(ids, creator, np.full(n, day, np.float32))
        return ids.astype(np.int32)

    # ------------------------------------------------------------------ world clock
    def tick(self, days: float, day: float) -> None:
        """Advances the world clock by ``days``: uploads, trending bursts, creators' response."""
        c, cat, rng = self.cfg.corpus, self.catalog, self.rng
        cat.world_day = day
        self._upload_acc += c.upload_rate * c.n_videos * days
        n_up = int(self._upload_acc)
        self._upload_acc -= n_up
        self.upload(n_up, day)
        # trending bursts: a random recent-ish video catches on, then fades
        decay = np.float32(0.5 ** (days / c.trend_half_life_days))
        self.trend[: self.n_items] *= decay
        self._burst_acc += c.trending_bursts_per_day * days
        nb = int(self._burst_acc)
        self._burst_acc -= nb
        if nb:
            v = rng.integers(0, self.n_items, nb)
            self.trend[v] = c.trend_strength
        cat.velocity[: self.n_items] *= np.float32(0.5 ** (days / 0.5))
        cat.velocity[: self.n_items] += self.trend[: self.n_items] * self.cfg.population * 0.02 * days
        if cat.velocity_region is not None:
            cat.velocity_region[:, : self.n_items] *= np.float32(0.5 ** (days / 0.5))
        if self.bot_rng is not None:
            self._bots(days)
        # creators: starved new creators upload less, stop, and are replaced by newcomers
        new = cat.new_creator_mask()
        starving = new & (day - self.creator_last_view > c.creator_starve_days)
        self.creator_rate[starving] *= np.float32(0.5 ** (days / c.creator_starve_days))
        recovering = ~starving & (self.creator_rate < self.creator_base_rate)
        self.creator_rate[recovering] = np.minimum(self.creator_rate[recovering] * (1 + days),
                                                   self.creator_base_rate[recovering])
        stopped = self.creator_rate < 0.1 * self.creator_base_rate
        if stopped.any():
            s = np.flatnonzero(stopped)
            self.creator_rate[s] = self.creator_base_rate[s]
            cat.creator_start_day[s] = day
            cat.creator_followers[s] = 0.0
            self.creator_last_view[s] = day
            self.creator_quality[s] = rng.beta(2.0, 2.0, s.size)
            self.stopped_creators += s.size

    stopped_creators = 0

    def _bots(self, days: float) -> None:
        """Engagement rings (``CorpusConfig.bot_rings_per_day``): start new rings, then add their fake views,
        likes and shares (no completions) to the targets' observable counters."""
        c, cat, rng = self.cfg.corpus, self.catalog, self.bot_rng
        assert rng is not None
        n = self.n_items
        self._ring_acc += c.bot_rings_per_day * days
        nr = int(self._ring_acc)
        self._ring_acc -= nr
        recent = cat.world_day - cat.upload_day[:n] < 3.0  # rings push new uploads into trending
        if not recent.any():
            recent[:] = True
        bad = recent & ((self.quality[:n] < 0.3) | (self.risk[:n] > 0.3))
        for _ in range(nr):
            pool = np.flatnonzero(bad if bad.any() and rng.random() < c.bot_low_quality_share else recent)
            v = int(rng.choice(pool))
            self.boost_days[v] = c.bot_ring_days
            self.ever_boosted[v] = True
        on = np.flatnonzero(self.boost_days[:n] > 0)
        if on.size:
            fake = np.float32(c.bot_ring_strength * c.trend_strength * self.cfg.population * 0.02 * days)
            cat.impressions[on] += fake
            cat.likes[on] += np.float32(0.7) * fake
            cat.shares[on] += np.float32(0.3) * fake
            cat.velocity[on] += fake
            self.boost_days[on] = np.maximum(self.boost_days[on] - days, 0.0)

    def boosted(self, item: Array) -> Array:
        """Same shape as ``item`` (-1 padding): the item is a ring's target now (hidden truth, for metrics)."""
        return (self.boost_days[np.maximum(item, 0)] > 0) & (item >= 0)

    def record(self, item: Array, shown: Array, signals: dict[str, Array], scale: float,
               region: Array | None = None) -> None:
        """Logs impressions and engagement of shown videos into the observable counters (and, with regions,
        each region's velocity from its users ``region`` (B,))."""
        cat = self.catalog
        m = shown & (item >= 0)
        it = item[m]
        if cat.velocity_region is not None and region is not None:
            eng_r = signals["like"][m] + signals["share"][m] + signals["complete"][m]
            rows = np.broadcast_to(np.asarray(region, np.int64)[:, None], item.shape)[m]
            np.add.at(cat.velocity_region, (rows, it), scale * eng_r)
        np.add.at(cat.impressions, it, scale)
        for name, arr in (("complete", cat.completes), ("like", cat.likes), ("share", cat.shares), ("skip", cat.skips)):
            np.add.at(arr, it, scale * signals[name][m])
        eng = signals["like"][m] + signals["share"][m] + signals["complete"][m]
        np.add.at(cat.velocity, it, scale * eng)
        cr = cat.creator[it]
        self.creator_last_view[cr] = cat.world_day
        np.add.at(cat.creator_followers, cr, scale * (signals["follow"][m] + 0.002))

