"""Stage 4: post-ranking rebalancing into the final feed (seeds/001, Stage 4 and "Explore vs. Exploit").

One greedy pass over feed positions:
- the combined score uses the knob-scaled head weights and in-session adaptation
  (engaged topics x1.3, skipped topics x0.5, both raised to the adaptation-strength knob);
- explore slots (20 % by default, evenly spaced) rank uncertain items by a Thompson sample
  ``score + uncertainty * N(0, 1)``; exploit slots use the point score;
- reserved new-creator slots (15 %) take the best new-creator item by content-quality estimate;
- hard diversity rules: at most 3 items per creator, at least 5 topics, at least 2 new-creator
  items, at most 2 consecutive items of one format; a soft per-topic repetition penalty scaled by
  the diversity-strength knob. A rule is relaxed only when the pool cannot satisfy it.

The pass runs user by user in a compiled kernel (numba, :func:`greedy_pass`); the same pass written
plainly, one user and one position at a time, is :mod:`rankers.rebalance_reference`, and a test holds
the two equal on random inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numba
import numpy as np

from rankers.config import PipelineConfig
from rankers.knobs import Knobs
from rankers.ranking import combined_score, descending_order
from rankers.types import Array, Feed, Pool
from rankers.user_model import UserView

NEG = np.float32(-1e30)


def slot_mask(share: Array, n: int, offset: float) -> Array:
    """(B, n) bool: ``round(share * n)`` positions spread evenly (Bresenham), per user."""
    j = np.arange(n, dtype=np.float32)[None, :]
    s = share[:, None].astype(np.float32)
    return np.floor((j + 1) * s + offset) > np.floor(j * s + offset)


@numba.njit(cache=True, nogil=True)
def _slot_kinds(new_share: Array, explore_share: Array, out: Array) -> None:
    """``out`` (B, F) int8 = ``where(new, NEW_CREATOR, where(explore & ~new, EXPLORE, EXPLOIT))`` with
    ``new = slot_mask(new_share, F, 0.0)`` and ``explore = slot_mask(explore_share, F, 0.5)``: the same float32
    operations, compiled (``tests/test_speed.py``)."""
    one, zero, half = np.float32(1.0), np.float32(0.0), np.float32(0.5)
    for u in range(out.shape[0]):
        s_new, s_exp = new_share[u], explore_share[u]
        for j in range(out.shape[1]):
            jf = np.float32(j)
            if np.floor((jf + one) * s_new + zero) > np.floor(jf * s_new + zero):
                out[u, j] = NEW_CREATOR
            elif np.floor((jf + one) * s_exp + half) > np.floor(jf * s_exp + half):
                out[u, j] = EXPLORE
            else:
                out[u, j] = EXPLOIT


def adapted_score(pool: Pool, knobs: Knobs, view: UserView, cfg: PipelineConfig, score: Array | None = None) -> Array:
    """(B, P) float32: weighted-sum score with the knob weights and in-session adaptation (``score``: the pool's
    combined score under the knobs, if it was computed already)."""
    if score is None:
        score = combined_score(pool.heads, knobs.weights(cfg), cfg)
    if not cfg.adaptation:
        return score
    eng_t, skp_t = view.session_topics()  # (B, T)
    s = knobs.adaptation_strength[:, None]
    # per (user, topic), then gathered per pool item: the same products as per (user, item)
    factor_t = np.where(eng_t, cfg.adapt_engaged**s, 1.0) * np.where(skp_t, cfg.adapt_skipped**s, 1.0)
    factor = np.take_along_axis(factor_t, pool.topic, axis=1)
    # Multiplicative boost that also ranks a negative score higher when boosted.
    return np.where(score >= 0, score * factor, score / factor).astype(np.float32)


#: Slot kinds of feed positions: which key ranks the items for the position (``GreedyInputs.keys``).
EXPLOIT, EXPLORE, NEW_CREATOR = 0, 1, 2


@dataclass(frozen=True)
class GreedyInputs:
    """What stage 4's greedy pass reads (B users, P pool items, F = ``feed_size`` positions)."""

    keys: Array  # (B, 3, P) float32 placement key by slot kind: point score, Thompson key, quality estimate
    slot_kind: Array  # (B, F) int8 EXPLOIT / EXPLORE / NEW_CREATOR of each feed position
    penalty: Array  # (B,) float32 key penalty per item of the same topic already in the feed
    valid: Array  # (B, P) bool the pool item exists (not consumed, not padding)
    topic: Array  # (B, P) int32
    creator: Array  # (B, P) int32, >= 0
    format: Array  # (B, P) int8
    new_creator: Array  # (B, P) bool


#: ``greedy(inputs, cfg, n_fill) -> (pool_index (B, n_fill) int32 (-1 = not filled), score (B, n_fill)
#: float32 (0 where not filled), rule_relaxed (B,) int32)``: the greedy pass over the first ``n_fill``
#: positions (:func:`greedy_pass`; the plain per-user :func:`rankers.rebalance_reference.greedy_pass_reference`).
GreedyPass = Callable[[GreedyInputs, PipelineConfig, int], tuple[Array, Array, Array]]


def rebalance(pool: Pool, knobs: Knobs, view: UserView, cfg: PipelineConfig, ts_noise: Array,
              n_positions: int | None = None, greedy: GreedyPass | None = None, score: Array | None = None) -> Feed:
    """Builds the ``cfg.feed_size`` feed for every user. ``ts_noise`` (B, P) standard normals.

    ``n_positions`` (default: the whole feed) stops the pass after that many leading positions, which
    are the same as the whole feed's (tested): the greedy pass fills position j from positions < j
    and the feed's length alone, never from later positions. The returned feed then has that many
    columns, and ``rule_relaxed`` counts the relaxations among them (the count rules, min topics and
    min new-creator items, are judged on a whole feed only). ``greedy`` replaces the compiled pass
    (:func:`greedy_pass`), e.g. by the reference it is tested against. ``score``: the pool's combined score under
    the knobs (``combined_score(pool.heads, knobs.weights(cfg), cfg)``), if the caller computed it."""
    f = cfg.feed_size
    n_fill = f if n_positions is None else n_positions
    if not 1 <= n_fill <= f:
        raise ValueError(f"rebalance: n_positions={n_positions} is invalid: must be in [1, feed_size={f}]")
    exploit = adapted_score(pool, knobs, view, cfg, score)
    if not cfg.rebalancing:
        return _top_of_ranking(pool, exploit, n_fill)
    inputs = greedy_inputs(pool, knobs, cfg, exploit, ts_noise)
    pool_index, score, relaxed = (greedy or greedy_pass)(inputs, cfg, n_fill)
    return _feed(pool, inputs, pool_index, score, relaxed)


def greedy_inputs(pool: Pool, knobs: Knobs, cfg: PipelineConfig, exploit: Array, ts_noise: Array) -> GreedyInputs:
    """The keys and the slot plan of the greedy pass: exploit slots rank by ``exploit`` (B, P), explore
    slots uncertain items first by a Thompson sample ``exploit + uncertainty * ts_noise``, reserved
    new-creator slots by the content-quality estimate."""
    b, p = pool.item.shape
    if all(a.dtype == np.float32 and a.shape == (b, p) for a in (exploit, pool.uncertainty, ts_noise)):
        keys = np.empty((b, 3, p), np.float32)
        _greedy_keys(np.ascontiguousarray(exploit), np.ascontiguousarray(pool.uncertainty),
                     np.ascontiguousarray(ts_noise), np.ascontiguousarray(pool.quality_est, np.float32),
                     np.float32(cfg.uncertainty_threshold), keys)
    else:  # other dtypes or broadcast shapes: the numpy formulas (float64 noise is multiplied in float64)
        uncertain = pool.uncertainty > cfg.uncertainty_threshold
        thompson = exploit + np.where(uncertain, pool.uncertainty * ts_noise, 0.0).astype(np.float32)
        explore_key = np.where(uncertain, thompson, thompson - 1e3)  # prefer uncertain items in explore slots
        keys = np.stack([exploit, explore_key.astype(np.float32), pool.quality_est.astype(np.float32)], axis=1)
    slot_kind = np.empty((b, cfg.feed_size), np.int8)  # reserved new-creator slots first, then explore slots
    _slot_kinds(np.ascontiguousarray(knobs.new_creator_share, np.float32),
                np.ascontiguousarray(knobs.explore_share, np.float32), slot_kind)
    # The soft topic penalty is part of the diversity rules: the ablation switches both off.
    penalty = np.broadcast_to(cfg.diversity_penalty * knobs.diversity_strength * cfg.diversity_rules, (b,))
    return GreedyInputs(keys=keys, slot_kind=slot_kind, penalty=np.ascontiguousarray(penalty, np.float32),
                        valid=pool.item >= 0, topic=np.ascontiguousarray(pool.topic, np.int32),
                        creator=np.ascontiguousarray(pool.creator, np.int32),
                        format=np.ascontiguousarray(pool.format, np.int8),
                        new_creator=np.ascontiguousarray(pool.new_creator, np.bool_))


@numba.njit(cache=True, nogil=True)
def _greedy_keys(exploit: Array, uncertainty: Array, ts_noise: Array, quality: Array, threshold: np.float32,
                 keys: Array) -> None:
    """Fills ``keys`` (B, 3, P) in one compiled pass, with the float32 operations of the numpy formulas it replaced:
    ``uncertain = uncertainty > threshold``, ``thompson = exploit + where(uncertain, uncertainty * ts_noise, 0)``,
    ``keys = stack([exploit, where(uncertain, thompson, thompson - 1e3), quality], axis=1)``; explore slots thus
    prefer uncertain items (``tests/test_speed.py`` holds the two equal)."""
    zero, thousand = np.float32(0.0), np.float32(1e3)
    for u in range(exploit.shape[0]):
        for i in range(exploit.shape[1]):
            e = exploit[u, i]
            unc = uncertainty[u, i]
            uncertain = unc > threshold
            t = e + (unc * ts_noise[u, i] if uncertain else zero)
            keys[u, 0, i] = e
            keys[u, 1, i] = t if uncertain else t - thousand
            keys[u, 2, i] = quality[u, i]


def greedy_pass(inputs: GreedyInputs, cfg: PipelineConfig, n_fill: int) -> tuple[Array, Array, Array]:
    """Stage 4's greedy pass over the first ``n_fill`` positions, compiled (:data:`GreedyPass`); the same
    placements, scores and relaxations as the per-user reference (tested on random inputs)."""
    b = inputs.valid.shape[0]
    pool_index = np.empty((b, n_fill), np.int32)
    score = np.empty((b, n_fill), np.float32)
    relaxed = np.empty(b, np.int32)
    _greedy_kernel(inputs.keys, inputs.slot_kind, inputs.penalty, inputs.valid, inputs.topic, inputs.creator,
                   inputs.format, inputs.new_creator, cfg.diversity_rules, cfg.feed_size, cfg.max_per_creator,
                   cfg.min_topics, cfg.min_new_creator, cfg.max_consecutive_format, pool_index, score, relaxed)
    return pool_index, score, relaxed


def _feed(pool: Pool, inputs: GreedyInputs, pool_index: Array, score: Array, relaxed: Array) -> Feed:
    """The greedy pass's placements as a :class:`Feed` (items, slot flags), in one compiled pass
    (:func:`_feed_kernel`; the numpy formulas it replaced are :func:`_feed_numpy`, used when an exploit key is NaN)."""
    b, n_fill = pool_index.shape
    item = np.empty((b, n_fill), np.int32)
    explore = np.empty((b, n_fill), np.bool_)
    reserved = np.empty((b, n_fill), np.bool_)
    diverted = np.empty((b, n_fill), np.bool_)
    ok = _feed_kernel(np.ascontiguousarray(pool.item, np.int32), pool_index, inputs.slot_kind, inputs.keys,
                      inputs.valid, item, explore, reserved, diverted)
    if not ok:  # a NaN exploit key: numpy's ordering of NaN decides, as before
        return _feed_numpy(pool, inputs, pool_index, score, relaxed)
    return Feed(item=item, pool_index=pool_index, score=score, explore=explore, reserved_new=reserved,
                rule_relaxed=relaxed, diverted=diverted)


@numba.njit(cache=True, nogil=True)
def _feed_kernel(pool_item: Array, pool_index: Array, slot_kind: Array, keys: Array, valid: Array, item: Array,
                 explore: Array, reserved: Array, diverted: Array) -> bool:
    """Fills ``item``, ``explore``, ``reserved`` and ``diverted`` (B, n_fill) as :func:`_feed_numpy` does: the pool
    item placed (-1 where none), the slot's kind where placed, and for an exploit slot whether its item's exploit
    key is below the best key among the items not placed at an earlier position (-1e30 for invalid ones). That
    best is found among each user's ``n_fill + 1`` best items only, as :func:`_diverted` does (enough: at most
    ``n_fill - 1`` of them are placed earlier). Returns False, with the outputs unfinished, if an exploit key of
    a valid item is NaN."""
    b, p = valid.shape
    n_fill = pool_index.shape[1]
    m = min(n_fill + 1, p)
    top_key = np.empty(m, np.float32)
    top_idx = np.empty(m, np.int64)
    taken = np.zeros(p, np.bool_)
    for u in range(b):
        n_top = 0  # top_key[:n_top] descending
        for i in range(p):
            v = keys[u, 0, i] if valid[u, i] else NEG
            if np.isnan(v):
                return False
            if n_top < m:
                n_top += 1
            elif v <= top_key[m - 1]:
                continue
            q = n_top - 1
            while q > 0 and top_key[q - 1] < v:
                top_key[q] = top_key[q - 1]
                top_idx[q] = top_idx[q - 1]
                q -= 1
            top_key[q] = v
            top_idx[q] = i
        for j in range(n_fill):
            idx = pool_index[u, j]
            placed = idx >= 0
            kind = slot_kind[u, j]
            item[u, j] = pool_item[u, idx] if placed else -1
            explore[u, j] = placed and kind == EXPLORE
            reserved[u, j] = placed and kind == NEW_CREATOR
            div = False
            if placed and kind == EXPLOIT:
                best = NEG
                for q in range(n_top):
                    if not taken[top_idx[q]]:
                        best = top_key[q]
                        break
                v = keys[u, 0, idx] if valid[u, idx] else NEG
                div = bool(v < best)
            diverted[u, j] = div
            if placed:
                taken[idx] = True
        for j in range(n_fill):  # clear for the next user
            if pool_index[u, j] >= 0:
                taken[pool_index[u, j]] = False
    return True


def _feed_numpy(pool: Pool, inputs: GreedyInputs, pool_index: Array, score: Array, relaxed: Array) -> Feed:
    """:func:`_feed` in numpy operations (the reference of the compiled pass, and its path for NaN keys)."""
    n_fill = pool_index.shape[1]
    placed = pool_index >= 0
    item = np.take_along_axis(pool.item, np.maximum(pool_index, 0), axis=1)
    kind = inputs.slot_kind[:, :n_fill]
    return Feed(item=np.where(placed, item, -1).astype(np.int32), pool_index=pool_index, score=score,
                explore=(kind == EXPLORE) & placed, reserved_new=(kind == NEW_CREATOR) & placed,
                rule_relaxed=relaxed, diverted=_diverted(inputs, pool_index) & (kind == EXPLOIT) & placed)


def _diverted(inputs: GreedyInputs, pool_index: Array) -> Array:
    """(B, n_fill) bool: the item placed at a position scores below the best item still available there (valid
    and not placed at an earlier position), by the exploit key. Only the ``n_fill + 1`` best items can be the
    best available at one of ``n_fill`` positions, so the check reads those only."""
    b, n_fill = pool_index.shape
    key = np.where(inputs.valid, inputs.keys[:, 0, :], NEG)
    m = min(n_fill + 1, key.shape[1])
    top = np.argpartition(-key, m - 1, axis=1)[:, :m] if m < key.shape[1] else np.broadcast_to(
        np.arange(key.shape[1]), (b, key.shape[1]))
    top_key = np.take_along_axis(key, top, axis=1)  # (B, m)
    taken = np.zeros(top.shape, bool)
    out = np.zeros((b, n_fill), bool)
    rows = np.arange(b)
    for f in range(n_fill):
        best = np.where(taken, NEG, top_key).max(axis=1)
        idx = pool_index[:, f]
        placed_key = np.where(idx >= 0, key[rows, np.maximum(idx, 0)], best)
        out[:, f] = placed_key < best
        taken |= top == idx[:, None]
    return out


@numba.njit(cache=True, nogil=True)
def _first_max(key: Array, allowed: Array) -> int:
    """``np.argmax(np.where(allowed, key, NEG))``: the first maximum (a NaN counts as the maximum)."""
    best_i = 0
    best = key[0] if allowed[0] else NEG
    if np.isnan(best):
        return 0
    for i in range(1, key.shape[0]):
        v = key[i] if allowed[i] else NEG
        if np.isnan(v):
            return i
        if v > best:
            best, best_i = v, i
    return best_i


@numba.njit(cache=True, nogil=True)
def _greedy_kernel(keys: Array, slot_kind: Array, penalty: Array, valid: Array, topic: Array, creator: Array,
                   fmt: Array, new_creator: Array, rules: bool, feed_size: int, max_per_creator: int, min_topics: int,
                   min_new_creator: int, max_consecutive_format: int, out_index: Array, out_score: Array,
                   out_relaxed: Array) -> None:
    """The greedy pass, user by user: per position, the best allowed item by the slot's key less the topic
    penalty; a reserved new-creator slot, a forced count rule (the positions left are just enough to meet
    min topics and min new creators) or no allowed item falls back in order to: allowed items that help
    the forced rule and suit the slot, allowed items that help, allowed items, any remaining item (a
    relaxed rule). Writes ``out_index``, ``out_score`` (B, n_fill) and ``out_relaxed`` (B,)."""
    b, p = valid.shape
    n_fill = out_index.shape[1]
    available = np.empty(p, np.bool_)  # valid and not yet placed
    eligible = np.empty(p, np.bool_)  # available and its creator under max_per_creator
    allowed = np.empty(p, np.bool_)  # every rule holds for this position
    chosen = np.empty(p, np.bool_)  # the set the fallback picks from
    topic_count = np.empty(p, np.float32)  # items already placed of this item's topic
    key = np.empty(p, np.float32)
    placed_creator = np.empty(n_fill, np.int64)  # -1 where nothing was placed
    slack = min_new_creator + min_topics  # a count rule can be forced only in the last `slack` positions
    for u in range(b):
        for i in range(p):
            available[i] = valid[u, i]
            eligible[i] = valid[u, i]
            topic_count[i] = 0.0
        n_topics = 0
        n_new = 0
        last_fmt = -1
        run = 0
        n_relaxed = 0
        pen = penalty[u]
        for j in range(n_fill):
            kind = slot_kind[u, j]
            banned_fmt = last_fmt if run >= max_consecutive_format else -2
            idx = 0  # the first maximum of the key over allowed items (NEG elsewhere; a NaN wins, as np.argmax)
            best = NEG
            found_nan = False
            for i in range(p):
                v = keys[u, kind, i] - pen * topic_count[i]
                key[i] = v
                ok = (eligible[i] and fmt[u, i] != banned_fmt) if rules else available[i]
                allowed[i] = ok
                if not found_nan:
                    masked = v if ok else NEG
                    if np.isnan(masked):
                        idx, found_nan = i, True
                    elif masked > best or i == 0:
                        idx, best = i, masked
            force = False
            new_need = 0
            topic_need = 0
            if rules and feed_size - j <= slack:
                new_need = max(min_new_creator - n_new, 0)
                topic_need = max(min_topics - n_topics, 0)
                force = new_need + topic_need >= feed_size - j
            has = allowed[idx]
            if force or kind == NEW_CREATOR or not has:
                if not has:
                    for i in range(p):
                        if available[i]:
                            n_relaxed += 1
                            break
                any_slot = False
                any_helpful = False
                for i in range(p):
                    helpful = allowed[i] and (not force or (new_creator[u, i] and new_need > 0)
                                              or (topic_count[i] == 0.0 and topic_need > 0))
                    any_helpful |= helpful
                    any_slot |= helpful and (kind != NEW_CREATOR or new_creator[u, i])
                for i in range(p):
                    helpful = allowed[i] and (not force or (new_creator[u, i] and new_need > 0)
                                              or (topic_count[i] == 0.0 and topic_need > 0))
                    if any_slot:
                        chosen[i] = helpful and (kind != NEW_CREATOR or new_creator[u, i])
                    elif any_helpful:
                        chosen[i] = helpful
                    elif has:
                        chosen[i] = allowed[i]
                    else:
                        chosen[i] = available[i]
                idx = _first_max(key, chosen)
                has = chosen[idx]
            c = -1
            if has:
                out_index[u, j] = idx
                out_score[u, j] = key[idx]
                available[idx] = False
                eligible[idx] = False
                if topic_count[idx] == 0.0:
                    n_topics += 1
                t = topic[u, idx]
                for i in range(p):
                    if topic[u, i] == t:
                        topic_count[i] += 1.0
                n_new += new_creator[u, idx]
                fm = fmt[u, idx]
                run = run + 1 if fm == last_fmt else 1
                last_fmt = fm
                c = creator[u, idx]
            else:
                out_index[u, j] = -1
                out_score[u, j] = 0.0
            if rules:
                n_same = 0
                for k in range(j):
                    n_same += placed_creator[k] == c
                if n_same >= max_per_creator - 1:  # creator c reached its cap (c = -1 changes nothing)
                    for i in range(p):
                        if creator[u, i] == c:
                            eligible[i] = False
            placed_creator[j] = c
        if rules and n_fill == feed_size:  # a count rule the pool could not meet (too few topics / new creators)
            n_relaxed += (n_topics < min_topics) + (n_new < min_new_creator)
        out_relaxed[u] = n_relaxed


def _top_of_ranking(pool: Pool, score: Array, f: int) -> Feed:
    """No rebalancing: the feed is the ``f`` best pool items by score."""
    b = pool.item.shape[0]
    key = np.where(pool.item >= 0, score, NEG)
    idx = descending_order(key)[:, :f].astype(np.int32)  # = np.argsort(-key, axis=1, kind="stable")[:, :f]
    ok = np.take_along_axis(pool.item, idx, axis=1) >= 0
    idx = np.where(ok, idx, -1)
    item = np.where(ok, np.take_along_axis(pool.item, np.maximum(idx, 0), axis=1), -1).astype(np.int32)
    none = np.zeros((b, f), bool)
    return Feed(item=item, pool_index=idx, diverted=np.zeros(idx.shape, bool),
                score=np.where(ok, np.take_along_axis(key, np.maximum(idx, 0), axis=1), 0.0),
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
