"""Configuration of the 4-stage recommender pipeline and of the agent's knobs.

Every number the seeds name lives here: the source sizes of stage 1, the cut sizes of stages 2-4,
the seed's ``RANKING_WEIGHTS``, the four diversity rules, the 80/20 explore/exploit split, the 15 %
new-creator slots, the x1.3 / x0.5 in-session adaptation, the ad positions and the one-hour
take-a-break prompt. Configs are frozen dataclasses validated on construction, so a wrong value
fails where it is written with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

#: The multi-task ranker's heads, in the order used by every ``(..., K)`` array.
HEADS: tuple[str, ...] = (
    "p_complete",
    "p_like",
    "p_share",
    "p_comment",
    "p_follow",
    "watch_time",
    "p_skip",
    "p_regret",
)
HEAD_INDEX: dict[str, int] = {name: i for i, name in enumerate(HEADS)}

#: The seed's weights (seeds/001, "RANKING_WEIGHTS"): negative for skip and regret.
RANKING_WEIGHTS: dict[str, float] = {
    "watch_time": 0.30,
    "p_complete": 0.15,
    "p_like": 0.15,
    "p_share": 0.15,
    "p_comment": 0.05,
    "p_follow": 0.10,
    "p_skip": -0.20,
    "p_regret": -0.30,
}

#: Names of the agent's knobs, in the order of the ``Box(-1, 1, (A,))`` action.
KNOB_NAMES: tuple[str, ...] = (
    *(f"weight.{h}" for h in HEADS),
    "explore_share",
    "new_creator_share",
    "diversity_strength",
    "adaptation_strength",
    "break_prompt",
)
N_KNOBS = len(KNOB_NAMES)


def check_value(cond: bool, cls: str, name: str, value: Any, rule: str) -> None:
    """``ValueError`` naming ``cls.name`` and its ``value`` unless ``cond`` holds (``rule`` says what it must be)."""
    if not cond:
        raise ValueError(f"{cls}.{name}={value!r} is invalid: must be {rule}")


def _coerce(cls: str, f: dataclasses.Field, v: Any) -> Any:
    """``v`` as the type ``f`` declares (``int``, ``float``, ``bool``, ``str``, ``tuple[int | float, ...]``, a
    nested config): numpy scalars and integral floats become Python numbers, lists tuples; anything else
    of the wrong type raises ``ValueError`` naming the field. Floats must be finite."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind.startswith("tuple[") and kind.endswith(", ...]"):
        of = kind[len("tuple["):-len(", ...]")]
        check_value(isinstance(v, (tuple, list)), cls, f.name, v, f"a sequence of {of}")
        return tuple(_coerce_scalar(cls, f"{f.name}[{i}]", of, x) for i, x in enumerate(v))
    if f.default_factory is not dataclasses.MISSING:
        # typeshed types the factory as a protocol mypy does not take as Hashable (the cache's key); it is a callable
        factory: Callable[[], object] = f.default_factory
        if (want := _nested_type(factory)) is not None:
            check_value(isinstance(v, want), cls, f.name, v,
                        f"a {want.__name__} (or, in replace, a dict of its fields)")
            return v
    return _coerce_scalar(cls, f.name, kind, v)


def _coerce_scalar(cls: str, name: str, kind: str, v: Any) -> Any:
    """One value of type ``kind`` (bool, int, float, str; others pass unchecked): see :func:`_coerce`."""
    if kind == "bool":
        check_value(isinstance(v, (bool, np.bool_)), cls, name, v, "True or False")
        return bool(v)
    if kind == "int":
        ok = isinstance(v, numbers.Integral) or (isinstance(v, numbers.Real) and math.isfinite(v)
                                                 and float(v).is_integer())
        check_value(ok and not isinstance(v, (bool, np.bool_)), cls, name, v, "an integer")
        return int(v)
    if kind == "float":
        check_value(isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)), cls, name, v, "a number")
        check_value(math.isfinite(v), cls, name, v, "a finite number")
        return float(v)
    if kind == "str":
        check_value(isinstance(v, str), cls, name, v, "a string")
    return v


@functools.cache
def _nested_type(factory: Callable[[], object]) -> type | None:
    """The config class a field's ``default_factory`` builds (None if not a dataclass), built once per factory:
    the string annotations of ``from __future__ import annotations`` do not name a class to check against."""
    want = type(factory())
    return want if dataclasses.is_dataclass(want) else None


def validate_fields(obj: Any) -> None:
    """Checks every field's type (:func:`_coerce`, which also turns numpy scalars and lists into the declared
    Python types in place) and the ``metadata`` rules given with ``field(metadata=...)``.

    Rules: ``min``/``max`` (inclusive), ``gt`` (exclusive lower bound), ``choices``.
    """
    cls = type(obj).__name__
    for f in dataclasses.fields(obj):
        raw = getattr(obj, f.name)
        v = _coerce(cls, f, raw)
        if v is not raw:
            object.__setattr__(obj, f.name, v)  # frozen: set once, during __post_init__
        md = f.metadata
        if not md:
            continue
        if "choices" in md:
            check_value(v in md["choices"], cls, f.name, raw, f"one of {md['choices']}")
            continue
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            check_value(math.isfinite(v), cls, f.name, raw, "a finite number")
            if "min" in md:
                check_value(v >= md["min"], cls, f.name, raw, f">= {md['min']}")
            if "gt" in md:
                check_value(v > md["gt"], cls, f.name, raw, f"> {md['gt']}")
            if "max" in md:
                check_value(v <= md["max"], cls, f.name, raw, f"<= {md['max']}")


def replace_nested(obj: Any, changes: dict[str, Any], where: str = "") -> Any:
    """A copy of the config ``obj`` with ``changes``; a dict given for a nested config replaces fields of it
    (at any depth: ``{"pipeline": {"knobs": {"break_range": 3.0}}}``). A name the config does not have raises
    ``ValueError`` naming it and the closest names."""
    known = {f.name for f in dataclasses.fields(obj)}
    kw: dict[str, Any] = {}
    for k, v in changes.items():
        if k not in known:
            close = difflib.get_close_matches(k, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; its fields: {', '.join(sorted(known))}"
            raise ValueError(f"{type(obj).__name__} has no field {where + k!r}{hint}")
        cur = getattr(obj, k)
        nested = isinstance(v, dict) and dataclasses.is_dataclass(cur)
        kw[k] = replace_nested(cur, v, f"{where}{k}.") if nested else v
    return dataclasses.replace(obj, **kw)


def checked_field(default: Any, **rules: Any) -> Any:
    """A config dataclass field with ``default`` and the ``rules`` :func:`validate_fields` checks (``min``,
    ``max``, ``gt``, ...)."""
    return field(default=default, metadata=rules)


@dataclass(frozen=True)
class KnobConfig:
    """How the agent's action in ``[-1, 1]^A`` maps to native knob values (zero = the seed)."""

    head_weight_range: float = checked_field(3.0, gt=1.0)
    """Head weight multiplier is ``range ** a``: a = 0 keeps the seed weight, a = +-1 scales by 3 or 1/3."""
    explore_delta: float = checked_field(0.2, min=0.0, max=0.5)
    """Explore share is ``seed share + delta * a`` (clipped to [0, 1])."""
    new_creator_delta: float = checked_field(0.15, min=0.0, max=0.5)
    """New-creator slot share is ``seed share + delta * a`` (clipped to [0, 1])."""
    break_range: float = checked_field(2.0, gt=1.0)
    """Break prompt threshold is ``seed minutes * range ** (-a)``: a = +1 prompts twice as early."""

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class PipelineConfig:
    """The 4-stage pipeline (seeds/001 "Step 2: High-Level Architecture")."""

    candidate_mode: str = checked_field("pipeline", choices=("pipeline", "recsim"))
    """``pipeline``: the 4 stages (sourcing -> pre-ranking -> ranking -> rebalancing) with a pool
    reused across requests. ``recsim``: RecSim ``interest_evolution``'s setting, for comparisons
    with it: at every request ``recsim_candidates`` items are drawn uniformly from the corpus
    (counter-based hashing keyed by user and request, duplicates dropped), scored by the stage-3
    scorer, and the top ``slate_size`` by combined score are served. No sourcing sources, no
    pre-ranking, no rebalancing, no ads or promoted content, no seen filter; the head-weight knobs
    still act, the stage-4 knobs do nothing. Needs ``slate_size <= feed_size <= recsim_candidates``."""
    recsim_candidates: int = checked_field(100, min=1)
    """Candidates drawn per request in ``candidate_mode="recsim"`` (RecSim interest_evolution: 100)."""
    # Stage 1: candidate sourcing (seed at scale: 5000/1000/1000/2000/1000 = 10k).
    n_interest: int = checked_field(1000, min=1)
    """Interest source: nearest neighbours of the user estimate among item embeddings."""
    n_following: int = checked_field(200, min=0)
    """Following source: recent videos of followed creators."""
    n_trending: int = checked_field(200, min=0)
    """Trending source: global and per-topic engagement velocity."""
    n_new_creator: int = checked_field(400, min=0)
    """New-creator exploration: pseudo-random sample of new creators' videos (content only)."""
    n_serendipity: int = checked_field(200, min=0)
    """Diversity / serendipity: high-quality videos from topics the user has not engaged with."""
    index: str = checked_field("flat", choices=("flat", "ivf"))
    """Retrieval index for the interest source: exact inner product or faiss IVF."""
    retrieval: str = checked_field("content", choices=("content", "two_tower"))
    """Vectors of the interest source. ``content``: the user estimate against the items' content
    embeddings. ``two_tower``: the trained two-tower model (:class:`rankers.serving.TwoTowerIndex`):
    the user tower fed from the system's view of the user, the item tower's vectors of every item
    (``index`` picks exact search or faiss IVF over them)."""
    retrieval_refresh_days: float = checked_field(1.0, gt=0.0)
    """``two_tower``: the item vectors of the whole catalog are recomputed every this many world days
    (they read logged counters); new and re-filled item slots get theirs at the next request."""
    ivf_nlist: int = checked_field(256, min=1)
    ivf_nprobe: int = checked_field(8, min=1)
    safety_threshold: float = checked_field(0.8, min=0.0, max=1.0)
    """Items whose moderation risk estimate exceeds this are filtered before ranking."""
    bot_filter: bool = False
    """Engagement-integrity detector of stage 1 (``rankers.sourcing.suspicious``): an item whose logged likes and
    shares run far ahead of its completions, ``(likes + shares) / (completes + 10) > bot_ratio`` (genuine videos
    sit near 0.2; bots like without watching), is treated as manipulated and kept out of the trending lists.
    Off by default (today's presets unchanged)."""
    bot_ratio: float = checked_field(0.6, gt=0.0)
    local_trending: bool = True
    """In worlds with regions or languages (``CorpusConfig.n_regions``): the global half of the trending source
    is the trending of the user's region, by the velocity among its users, in the user's language (False:
    global trending only). No effect in a world of one region and one language."""
    regional_prior: bool = True
    """In worlds with regions or languages: a new user's first interest estimate is the prior of their region
    and language (the mean content of what trends there, ``rankers.sourcing.regional_prior``) rather than the
    population mean. No device prior: the world has no devices."""
    seen_memory: int = checked_field(400, min=10)
    """How many recently shown items per user are filtered from new candidates."""
    # Stage 2: pre-ranking.
    n_prerank: int = checked_field(500, min=1)
    preranker: str = checked_field("heuristic", choices=("heuristic", "learned"))
    """``heuristic``: :func:`rankers.ranking.prerank_score` (affinity, logged rates, quality);
    ``learned``: the trained pre-ranker MLP (:class:`rankers.serving.LearnedPreRanker`)."""
    # Stage 3: ranking.
    n_rank: int = checked_field(100, min=1)
    scorer: str = checked_field("noisy_oracle", choices=("noisy_oracle", "learned"))
    """``noisy_oracle``: a noisy view of the world's truth (:class:`rankers.ranking.NoisyOracleScorer`);
    ``learned``: the trained multi-task ranker (:class:`rankers.serving.LearnedScorer`), given to
    ``make_scorer`` as a model or a checkpoint path."""
    scorer_noise: float = checked_field(0.35, min=0.0, max=5.0)
    """Noise (logit scale) of the noisy-oracle scorer on a well-observed item; 0 = the truth."""
    scorer_cold_noise: float = checked_field(1.0, min=0.0, max=5.0)
    """Extra noise on items with few impressions, decaying as ``1/sqrt(1 + impressions/cold_impressions)``."""
    cold_impressions: float = checked_field(50.0, gt=0.0)
    score_mode: str = checked_field("weighted_sum", choices=("weighted_sum", "engagement"))
    """``weighted_sum``: the seed's RANKING_WEIGHTS; ``engagement``: E[watch_time] x p_complete (pure engagement)."""
    watch_time_scale_s: float = checked_field(30.0, gt=0.0)
    """E[watch_time] enters the weighted sum in units of this many seconds."""
    pool_quota_new_creator: int = checked_field(20, min=0)
    """Stage 2/3 cuts keep at least this many new-creator items at the seed's 15 % slot share (so stage 4 can
    honour its slots); the quota scales with the new-creator-share knob (0 slots, no quota)."""
    pool_quota_serendipity: int = checked_field(15, min=0)
    """Stage 2/3 cuts keep at least this many serendipity items (so the topic rule is feasible)."""
    # Stage 4: rebalancing.
    feed_size: int = checked_field(50, min=1)
    slate_size: int = checked_field(10, min=1)
    rebalancing: bool = True
    """False: stage 4 only takes the top of the (adapted) ranking: no rules, slots or exploration."""
    adaptation: bool = True
    """The seed's real-time adaptation (within-session feature updates: engaged topics x1.3, skipped x0.5,
    raised to the adaptation-strength knob). A component of its own in the seed, kept by the pure-engagement
    baseline (it raises engagement); False is the seed's "batch-only (daily profiles)" alternative."""
    diversity_rules: bool = True
    """Hard rules (max per creator, min topics, min new-creator videos, max consecutive format) and the
    soft per-topic repetition penalty; False switches all of them off (the "no diversity rules" ablation)."""
    max_per_creator: int = checked_field(3, min=1)
    min_topics: int = checked_field(5, min=0)
    min_new_creator: int = checked_field(2, min=0)
    max_consecutive_format: int = checked_field(2, min=1)
    diversity_penalty: float = checked_field(0.05, min=0.0)
    """Soft penalty per earlier feed item of the same topic, times the diversity-strength knob."""
    explore_share: float = checked_field(0.2, min=0.0, max=1.0)
    """The seed's 80/20 exploit/explore mix: share of feed slots ranked by Thompson samples."""
    uncertainty_threshold: float = checked_field(0.02, min=0.0)
    """Items whose score uncertainty exceeds this are sampled (Thompson), others use the point score."""
    new_creator_share: float = checked_field(0.15, min=0.0, max=1.0)
    """Reserved new-creator slots (seed: 15 %), filled by content-quality estimate."""
    adapt_engaged: float = checked_field(1.3, min=1.0)
    adapt_skipped: float = checked_field(0.5, gt=0.0, max=1.0)
    engaged_watch_frac: float = checked_field(0.5, min=0.0, max=1.0)
    skipped_watch_frac: float = checked_field(0.1, min=0.0, max=1.0)
    ads: bool = True
    ad_positions: tuple[int, ...] = (5, 12, 20, 30, 40)
    """1-based positions of ads in every 50 videos of a session (seed)."""
    promoted_position: int = checked_field(3, min=0)
    """1-based position of promoted content in every 50 videos (0 = none)."""
    break_after_min: float = checked_field(60.0, gt=0.0)
    """Take-a-break prompt after this many minutes in session (seed: one hour)."""
    ranking_weights: tuple[float, ...] = tuple(RANKING_WEIGHTS[h] for h in HEADS)
    knobs: KnobConfig = field(default_factory=KnobConfig)

    def __post_init__(self) -> None:
        validate_fields(self)
        cls = type(self).__name__
        check_value(len(self.ranking_weights) == len(HEADS), cls, "ranking_weights", self.ranking_weights,
               f"{len(HEADS)} weights, one per head {HEADS}")
        check_value(self.n_prerank >= self.n_rank, cls, "n_prerank", self.n_prerank, f">= n_rank ({self.n_rank})")
        check_value(self.n_rank >= self.feed_size, cls, "n_rank", self.n_rank, f">= feed_size ({self.feed_size})")
        check_value(self.feed_size >= self.slate_size, cls, "feed_size", self.feed_size,
               f">= slate_size ({self.slate_size})")
        check_value(all(1 <= p <= self.feed_size for p in self.ad_positions), cls, "ad_positions",
               self.ad_positions, f"1-based positions within feed_size={self.feed_size}")
        check_value(len(set(self.ad_positions)) == len(self.ad_positions), cls, "ad_positions", self.ad_positions,
               "positions without repeats")
        check_value(self.promoted_position <= self.feed_size, cls, "promoted_position", self.promoted_position,
               f"<= feed_size ({self.feed_size})")
        if self.candidate_mode == "recsim":
            check_value(self.recsim_candidates >= self.feed_size, cls, "recsim_candidates", self.recsim_candidates,
                   f">= feed_size ({self.feed_size}) in candidate_mode='recsim'")
        check_value(self.pool_quota_new_creator + self.pool_quota_serendipity <= self.n_rank, cls,
               "pool_quota_new_creator", self.pool_quota_new_creator, "with the serendipity quota <= n_rank")

    @property
    def learned_models(self) -> tuple[str, ...]:
        """Kinds of trained models this pipeline needs (``two_tower``, ``preranker``, ``ranker``); () = none."""
        need = (("two_tower", self.retrieval == "two_tower"), ("preranker", self.preranker == "learned"),
                ("ranker", self.scorer == "learned"))
        return tuple(k for k, on in need if on)

    @property
    def n_sourced(self) -> int:
        """Upper bound on stage-1 candidates per user (before dedup and filters)."""
        return self.n_interest + self.n_following + self.n_trending + self.n_new_creator + self.n_serendipity


class PipelineSwitches(TypedDict):
    """The three stage switches of a :class:`PipelineConfig` (keyword arguments for it or its ``replace``)."""

    retrieval: str
    preranker: str
    scorer: str


LEARNED_PIPELINE: PipelineSwitches = {"retrieval": "two_tower", "preranker": "learned", "scorer": "learned"}
"""The learned pipeline's switches: two-tower retrieval, learned pre-ranker and multi-task ranker (the default of
the ``small`` and ``default`` presets)."""
NOISY_ORACLE_PIPELINE: PipelineSwitches = {"retrieval": "content", "preranker": "heuristic", "scorer": "noisy_oracle"}
"""The noisy-oracle pipeline's switches: content retrieval, heuristic pre-ranking and a noisy view of the world's
truth for stage 3, no trained models (the default of ``tiny`` and ``large``; an ablation and fast tests elsewhere)."""

