""""Why you're seeing this": the reason every served slot holds its item, as arrays and as a sentence.

The pipeline records, per slot of a :class:`rankers.types.Slate` (batched, in ``info["slate"]``):

- ``source``: the stage-1 source that retrieved the item (:data:`SOURCES`; -1 for ads, promoted items and the
  RecSim setting, which has no sourcing);
- ``top_head``: the ranking head whose weighted prediction added most to the item's score (:data:`HEADS`);
- ``reason``: why stage 4 put it in this slot (:data:`REASONS`), the first that applies of: an ad; promoted
  content; a reserved new-creator slot; an exploration slot (a Thompson sample of an uncertain item); a
  diversity rule or the topic penalty (an exploit slot whose item is not the best-scored one left:
  ``Feed.diverted``); in-session adaptation (the item's topic was engaged with in this session, which raised
  its score); else ranked by the weighted sum.

:func:`explain` turns one user's slate into short sentences for that user, from what the system knows (never
the hidden world): e.g. "Because you watched topic 7 videos this session".
"""

from __future__ import annotations

from rankers.config import HEADS
from rankers.types import Array, Slate

REASONS: tuple[str, ...] = ("ranked", "exploration", "new_creator_slot", "diversity", "adaptation", "ad", "promoted")
RANKED, EXPLORATION, NEW_CREATOR_SLOT, DIVERSITY, ADAPTATION, AD, PROMOTED = range(len(REASONS))

SOURCES: tuple[str, ...] = ("interest", "following", "trending", "new_creator", "serendipity")
"""Stage-1 sources in the order of ``rankers.sourcing.SRC_*``."""

_SOURCE_TEXT = {
    "interest": "it is close to what you usually watch",
    "following": "you follow this creator",
    "trending": "it is trending now",
    "new_creator": "it comes from a new creator",
    "serendipity": "it is something different from your usual",
}
_HEAD_TEXT = {
    "p_complete": "you are likely to watch it to the end", "p_like": "you are likely to like it",
    "p_share": "you are likely to share it", "p_comment": "you are likely to comment on it",
    "p_follow": "you may follow its creator", "watch_time": "you are likely to watch it for a while",
    "p_skip": "you are unlikely to skip it", "p_regret": "you are unlikely to regret watching it",
}


def explain(slate: Slate, row: int, topic: Array) -> list[str]:
    """One sentence per slot of user ``row``'s slate; ``topic`` (S,) the topic of each slot's item (-1 for
    ads), e.g. ``catalog.topic[slate.item[row]]``."""
    out = []
    for j in range(slate.item.shape[1]):
        why = REASONS[int(slate.reason[row, j])]
        src = int(slate.source[row, j])
        head = int(slate.top_head[row, j])
        if why == "ad":
            out.append("Sponsored: an ad chosen for your interests")
            continue
        if why == "promoted":
            out.append("Promoted content")
            continue
        lead = {
            "new_creator_slot": "To help new creators be seen",
            "exploration": "Something we are not sure you will like yet, to learn your taste",
            "diversity": "To keep your feed varied",
            "adaptation": f"Because you watched topic {int(topic[j])} videos this session",
            "ranked": "Recommended for you",
        }[why]
        parts = []
        if src >= 0:
            parts.append(_SOURCE_TEXT[SOURCES[src]])
        if head >= 0 and why in ("ranked", "adaptation"):
            parts.append(_HEAD_TEXT[HEADS[head]])
        out.append(lead + (": " + " and ".join(parts) if parts else ""))
    return out
