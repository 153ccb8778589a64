"""Stage 4: post-ranking rebalancing into the final feed (seeds/001, Stage 4 and "Explore vs. Exploit").

One greedy pass over feed positions, vectorised over users and pool items:
- the combined score uses the knob-scaled head weights and in-session adaptation
  (engaged topics x1.3, skipped topics x0.5, both raised to the adaptation-strength knob);
- explore slots (20 % by default, evenly spaced) rank uncertain items by a Thompson sample
  ``score + uncertainty * N(0, 1)``; exploit slots use the point score;
- reserved new-creator slots (15 %) take the best new-creator item by content-quality estimate;
- hard diversity rules: at most 3 items per creator, at least 5 topics, at least 2 new-creator
  items, at most 2 consecutive items of one format; a soft per-topic repetition penalty scaled by
  the diversity-strength knob. A rule is relaxed only when the pool cannot satisfy it.
"""

from __future__ import annotations

import numpy as np

from rankers.config import PipelineConfig
from rankers.knobs import Knobs
from rankers.ranking import combined_score
from rankers.types import Array, Feed, Pool
from rankers.user_model import UserView

NEG = np.float32(-1e30)


def slot_mask(share: Array, n: int, offset: float) -> Array:
    """(B, n) bool: ``round(share * n)`` positions spread evenly (Bresenham), per user."""
    j = np.arange(n, dtype=np.float32)[None, :]
    s = share[:, None].astype(np.float32)
    return np.floor((j + 1) * s + offset) > np.floor(j * s + offset)


def adapted_score(pool: Pool, knobs: Knobs, view: UserView, cfg: PipelineConfig) -> Array:
    """(B, P) float32: weighted-sum score with the knob weights and in-session adaptation."""
    score = combined_score(pool.heads, knobs.weights(cfg), cfg)
    if not cfg.adaptation:
        return score
    rows = np.arange(pool.item.shape[0])[:, None]
    eng_t, skp_t = view.session_topics()
    eng = eng_t[rows, pool.topic]
    skp = skp_t[rows, pool.topic]
    s = knobs.adaptation_strength[:, None]
    factor = np.where(eng, cfg.adapt_engaged**s, 1.0) * np.where(skp, cfg.adapt_skipped**s, 1.0)
    # Multiplicative boost that also ranks a negative score higher when boosted.
    return np.where(score >= 0, score * factor, score / factor).astype(np.float32)


def rebalance(pool: Pool, knobs: Knobs, view: UserView, cfg: PipelineConfig, ts_noise: Array,
              n_positions: int | None = None) -> Feed:
    """Builds the ``cfg.feed_size`` feed for every user. ``ts_noise`` (B, P) standard normals.

    ``n_positions`` (default: the whole feed) stops the pass after that many leading positions, which
    are the same as the whole feed's (tested): the greedy pass fills position j from positions < j
    and the feed's length alone, never from later positions. The returned feed then has that many
    columns, and ``rule_relaxed`` counts the relaxations among them (the count rules, min topics and
    min new-creator items, are judged on a whole feed only)."""
    b, p = pool.item.shape
    f = cfg.feed_size
    n_fill = f if n_positions is None else n_positions
    if not 1 <= n_fill <= f:
        raise ValueError(f"rebalance: n_positions={n_positions} is invalid: must be in [1, feed_size={f}]")
    rows = np.arange(b)
    valid = pool.item >= 0
    exploit = adapted_score(pool, knobs, view, cfg)
    if not cfg.rebalancing:
        return _top_of_ranking(pool, exploit, n_fill)
    uncertain = pool.uncertainty > cfg.uncertainty_threshold
    thompson = exploit + np.where(uncertain, pool.uncertainty * ts_noise, 0.0).astype(np.float32)
    explore_key = np.where(uncertain, thompson, thompson - 1e3)  # prefer uncertain items in explore slots
    new_key = pool.quality_est.astype(np.float32)
    new_pos = slot_mask(knobs.new_creator_share, f, 0.0)
    exp_pos = slot_mask(knobs.explore_share, f, 0.5) & ~new_pos
    # The soft topic penalty is part of the diversity rules: the ablation switches both off.
    penalty = (cfg.diversity_penalty * knobs.diversity_strength * cfg.diversity_rules)[:, None]

    # State kept incrementally so each position costs a few (B, P) passes and few numpy calls. The
    # pick is first made from ``ok`` (every rule holds) for all users; only rows with a reserved
    # slot, a forced rule or nothing allowed are re-picked with the fallbacks. Per-user lookups use
    # flat indices into (B, P + 1) copies whose last column is a "nothing placed" sentinel.
    t = int(max(pool.topic.max(initial=0), 0)) + 1  # topic ids 0..t-1; t is the sentinel
    rows_p = rows * p
    rows_p1 = rows * (p + 1)
    creator_s = _with_sentinel(pool.creator, -1)
    topic_s = _with_sentinel(pool.topic, t)
    fmt = pool.format.astype(np.int16)
    fmt_s = _with_sentinel(fmt, -3)
    newc_s = _with_sentinel(pool.new_creator, False)
    avail = valid.copy()  # not yet placed
    elig = valid.copy()  # not yet placed and its creator under max_per_creator
    hist_c = np.full((b, n_fill), -1, np.int32)  # creators placed so far (-1 = none)
    topic_cnt = np.zeros((b, p), np.float32)  # feed items so far of this item's topic (exact small ints)
    n_topics = np.zeros(b, np.int32)
    n_new = np.zeros(b, np.int32)
    last_fmt = np.full(b, -1, np.int16)
    run = np.zeros(b, np.int32)
    out_idx = np.full((b, n_fill), -1, np.int32)
    out_score = np.zeros((b, n_fill), np.float32)
    relaxed = np.zeros(b, np.int32)
    rules = cfg.diversity_rules
    max_run, max_cr = cfg.max_consecutive_format, cfg.max_per_creator
    slack = cfg.min_new_creator + cfg.min_topics  # a rule can be forced only in the last `slack` slots
    keys3 = np.stack([exploit, explore_key.astype(np.float32), new_key], axis=1).reshape(b * 3, p)  # (B*3, P)
    kind = np.where(new_pos, 2, np.where(exp_pos, 1, 0)) + (rows * 3)[:, None]  # (B, F) row of keys3
    no_force = np.zeros(b, bool)
    for j in range(n_fill):
        force = no_force
        if rules:
            ok = fmt != np.where(run >= max_run, last_fmt, -2)[:, None]
            ok &= elig
            if f - j <= slack:
                new_need = np.maximum(cfg.min_new_creator - n_new, 0)
                topic_need = np.maximum(cfg.min_topics - n_topics, 0)
                force = (new_need + topic_need) >= (f - j)
        else:
            ok = avail
        key = keys3[kind[:, j]]
        key -= penalty * topic_cnt
        idx = np.where(ok, key, NEG).argmax(axis=1)
        flat = rows_p + idx
        has = ok.take(flat)  # = ok.any(1): the argmax lands on an allowed item if there is one
        sp = np.flatnonzero(force | new_pos[:, j] | ~has)
        if sp.size:
            sel: Array | slice = slice(None) if sp.size == b else sp  # every row: views, no gathers
            ok_s = ok[sel]
            av_s = avail[sel]
            any_ok = has[sel]
            relaxed[sel] += ~any_ok & av_s.any(1)
            ok_f = ok_s
            fs = force[sel]
            if fs.any():
                helpful = ((pool.new_creator[sel] & (new_need[sel] > 0)[:, None])
                           | ((topic_cnt[sel] == 0) & (topic_need[sel] > 0)[:, None]))
                ok_f = np.where(fs[:, None], ok_s & helpful, ok_s)
            ok_slot = np.where(new_pos[sel, j][:, None], ok_f & pool.new_creator[sel], ok_f)
            m_s = np.where(ok_slot.any(1)[:, None], ok_slot,
                           np.where(ok_f.any(1)[:, None], ok_f, np.where(any_ok[:, None], ok_s, av_s)))
            i_s = np.where(m_s, key[sel], NEG).argmax(axis=1)
            idx[sel] = i_s
            has[sel] = m_s[np.arange(sp.size), i_s]
            flat = rows_p + idx
        if has.all():
            out_idx[:, j] = idx
            out_score[:, j] = key.take(flat)
            fe = rows_p1 + idx
            avail.ravel()[flat] = False
            if rules:
                elig.ravel()[flat] = False
            n_topics += topic_cnt.take(flat) == 0
        else:
            out_idx[:, j] = np.where(has, idx, -1)
            out_score[:, j] = np.where(has, key.take(flat), 0.0)
            if not has.any():
                continue
            fh = flat[has]
            avail.ravel()[fh] = False
            if rules:
                elig.ravel()[fh] = False
            fe = rows_p1 + np.where(has, idx, p)  # sentinel column where nothing was placed
            n_topics += (topic_cnt.take(flat) == 0) & has
        c = creator_s.take(fe)
        fm = fmt_s.take(fe)
        if rules:
            hit = np.flatnonzero((hist_c[:, :j] == c[:, None]).sum(axis=1) >= max_cr - 1)
            if hit.size:  # this creator just reached its cap (rows with c = -1 change nothing)
                elig[hit] &= pool.creator[hit] != c[hit, None]
        hist_c[:, j] = c
        topic_cnt += pool.topic == topic_s.take(fe)[:, None]
        n_new += newc_s.take(fe)
        run = np.where(has, np.where(fm == last_fmt, run + 1, 1), run)
        last_fmt = np.where(has, fm, last_fmt)
    if rules and n_fill == f:  # a count rule the pool could not meet by the end (too few topics / new creators)
        relaxed += (n_topics < cfg.min_topics).astype(np.int32) + (n_new < cfg.min_new_creator)
    safe = np.maximum(out_idx, 0)
    item = np.where(out_idx >= 0, pool.item[rows[:, None], safe], -1).astype(np.int32)
    return Feed(item=item, pool_index=out_idx, score=out_score, explore=exp_pos[:, :n_fill] & (out_idx >= 0),
                reserved_new=new_pos[:, :n_fill] & (out_idx >= 0), rule_relaxed=relaxed)


def _with_sentinel(a: Array, value: object) -> Array:
    """(B, P) -> (B, P + 1) copy whose last column is ``value``."""
    out = np.empty((a.shape[0], a.shape[1] + 1), a.dtype)
    out[:, :-1] = a
    out[:, -1] = value
    return out


def _top_of_ranking(pool: Pool, score: Array, f: int) -> Feed:
    """No rebalancing: the feed is the ``f`` best pool items by score."""
    b = pool.item.shape[0]
    key = np.where(pool.item >= 0, score, NEG)
    idx = np.argsort(-key, axis=1, kind="stable")[:, :f].astype(np.int32)
    ok = np.take_along_axis(pool.item, idx, axis=1) >= 0
    idx = np.where(ok, idx, -1)
    item = np.where(ok, np.take_along_axis(pool.item, np.maximum(idx, 0), axis=1), -1).astype(np.int32)
    none = np.zeros((b, f), bool)
    return Feed(item=item, pool_index=idx, score=np.where(ok, np.take_along_axis(key, np.maximum(idx, 0), axis=1), 0.0),
                explore=none, reserved_new=none.copy(), rule_relaxed=np.zeros(b, np.int32))


def check_feed_rules(item: Array, topic: Array, creator: Array, fmt: Array, new_creator: Array,
                     cfg: PipelineConfig) -> dict[str, Array]:
    """Checks the four diversity rules on feeds (B, F) (-1 pads are ignored). Returns (B,) bool per rule."""
    valid = item >= 0
    b = item.shape[0]
    big = np.int64(1) << 40
    ck = np.where(valid, creator.astype(np.int64), big + np.arange(item.shape[1]))
    s = np.sort(ck, axis=1)
    # max run of equal creators in the sorted row = max count per creator
    same = np.zeros_like(s, dtype=np.int32)
    for j in range(1, s.shape[1]):
        same[:, j] = np.where(s[:, j] == s[:, j - 1], same[:, j - 1] + 1, 0)
    max_per_creator = same.max(axis=1) + 1
    tk = np.where(valid, topic.astype(np.int64), -1)
    ts = np.sort(tk, axis=1)
    n_topics = ((ts[:, 1:] != ts[:, :-1]) & (ts[:, 1:] >= 0)).sum(axis=1) + (ts[:, 0] >= 0)
    n_new = (new_creator & valid).sum(axis=1)
    fk = np.where(valid, fmt.astype(np.int64), -1 - np.arange(item.shape[1]))
    run = np.ones((b,), np.int32)
    max_run = np.ones((b,), np.int32)
    for j in range(1, fk.shape[1]):
        run = np.where(fk[:, j] == fk[:, j - 1], run + 1, 1)
        max_run = np.maximum(max_run, run)
    n_valid = valid.sum(axis=1)
    return {
        "max_per_creator": max_per_creator <= cfg.max_per_creator,
        "min_topics": n_topics >= np.minimum(cfg.min_topics, n_valid),
        "min_new_creator": n_new >= np.minimum(cfg.min_new_creator, n_valid),
        "max_consecutive_format": max_run <= cfg.max_consecutive_format,
    }
