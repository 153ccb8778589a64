"""Stage 4's greedy pass written plainly, one user and one position at a time: the reference the
compiled pass (:func:`rankers.rebalance.greedy_pass`) is tested against (``tests/test_stage4_reference.py``).

Slow on purpose: every rule is recomputed from the feed placed so far, with no incremental state.
Use it through ``rebalance(..., greedy=greedy_pass_reference)``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from rankers.config import PipelineConfig
from rankers.rebalance import NEG, NEW_CREATOR, GreedyInputs
from rankers.types import Array


def greedy_pass_reference(inputs: GreedyInputs, cfg: PipelineConfig, n_fill: int) -> tuple[Array, Array, Array]:
    """The greedy pass over the first ``n_fill`` positions of every user (a :data:`rankers.rebalance.GreedyPass`)."""
    b = inputs.valid.shape[0]
    pool_index = np.full((b, n_fill), -1, np.int32)
    score = np.zeros((b, n_fill), np.float32)
    relaxed = np.zeros(b, np.int32)
    for u in range(b):
        pool_index[u], score[u], relaxed[u] = plan_feed(inputs, u, cfg, n_fill)
    return pool_index, score, relaxed


def best(key: list[np.float32], allowed: list[bool]) -> int:
    """The item with the highest key among ``allowed`` (the first one on ties; 0 if none is allowed)."""
    return int(np.argmax(np.array([k if ok else NEG for k, ok in zip(key, allowed)], np.float32)))


def plan_feed(g: GreedyInputs, u: int, cfg: PipelineConfig, n_fill: int) -> tuple[list[int], list[np.float32], int]:
    """User ``u``'s first ``n_fill`` feed positions: (pool index per position (-1 = not filled), the key it
    was placed by (0 if none), the number of relaxed rules)."""
    p = g.valid.shape[1]
    items = range(p)
    topic, creator, fmt, new = g.topic[u], g.creator[u], g.format[u], g.new_creator[u]
    placed: list[int] = []  # pool indices in feed order (positions left empty are skipped)
    out_index, out_score = [], []
    n_relaxed = 0
    for j in range(n_fill):
        kind = g.slot_kind[u, j]
        # The slot's key less the soft penalty for each item of the same topic already in the feed.
        same_topic = [sum(topic[k] == topic[i] for k in placed) for i in items]
        key = [np.float32(g.keys[u, kind, i]) - np.float32(g.penalty[u]) * np.float32(same_topic[i]) for i in items]
        available = [bool(g.valid[u, i]) and i not in placed for i in items]
        force, new_need, topic_need = False, 0, 0
        if cfg.diversity_rules:
            per_creator = Counter(int(creator[k]) for k in placed)
            run_fmt = int(fmt[placed[-1]]) if placed else None
            run = 0
            for k in reversed(placed):  # consecutive items of the last format
                if fmt[k] != run_fmt:
                    break
                run += 1
            allowed = [available[i] and per_creator[int(creator[i])] < cfg.max_per_creator
                       and not (run >= cfg.max_consecutive_format and fmt[i] == run_fmt) for i in items]
            # Count rules: forced when the positions left are just enough to meet them.
            new_need = max(cfg.min_new_creator - sum(bool(new[k]) for k in placed), 0)
            topic_need = max(cfg.min_topics - len({int(topic[k]) for k in placed}), 0)
            force = new_need + topic_need >= cfg.feed_size - j
        else:
            allowed = available
        pick = best(key, allowed)
        ok = allowed[pick]
        if force or kind == NEW_CREATOR or not ok:
            if not ok and any(available):
                n_relaxed += 1  # no item satisfies every rule: one is relaxed
            helpful = [allowed[i] and (not force or (bool(new[i]) and new_need > 0)
                                       or (same_topic[i] == 0 and topic_need > 0)) for i in items]
            in_slot = [helpful[i] and (kind != NEW_CREATOR or bool(new[i])) for i in items]
            fallbacks = [in_slot, helpful, *([allowed] if ok else []), available]
            chosen = next((c for c in fallbacks if any(c)), available)
            pick = best(key, chosen)
            ok = chosen[pick]
        if ok:
            placed.append(pick)
            out_index.append(pick)
            out_score.append(key[pick])
        else:
            out_index.append(-1)
            out_score.append(np.float32(0.0))
    if cfg.diversity_rules and n_fill == cfg.feed_size:  # count rules the pool could not meet
        n_relaxed += len({int(topic[k]) for k in placed}) < cfg.min_topics
        n_relaxed += sum(bool(new[k]) for k in placed) < cfg.min_new_creator
    return out_index, out_score, n_relaxed
