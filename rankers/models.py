"""Learned models of the pipeline (torch, CPU, small): two-tower retrieval, pre-ranker, multi-task ranker.

Every model reads the same :class:`Features`, built by one function (:func:`build_features`) from one
*raw feature dict* of numpy arrays, whatever produced it: logged impression rows for training
(:func:`raw_from_rows`, one candidate per row) or the live system at serving time
(:func:`raw_from_serving`, from :class:`~rankers.user_model.UserView` and the observable
:class:`~rankers.types.Catalog`). Nothing hidden enters: the user side is the system's user estimate
and logged context, the item side the catalog's content-model outputs and logged counters.

Raw feature dict (B users, C candidates, E content-embedding dims, R = len(RATE_NAMES))::

    user_emb (B, E) float32        the system's interest estimate before the request
    cold (B,) float32              cold-start flag (new user with < 20 impressions)
    session_minutes (B,) float32   minutes in the current session so far
    session_videos (B,) float32    videos in the current session so far
    rates (B, R) float32           EMA of the user's recent engagement rates (RATE_NAMES order)
    video_id (B, C) int64          item ids (-1 = padding)
    topic (B, C) int64 · format (B, C) int64
    duration_s (B, C) float32 · impressions (B, C) float32 (logged counter before the request)
    new_creator (B, C) float32 · promoted (B, C) float32
    item_emb (B, C, E) float32     content embedding (content-understanding model)
    quality_est (B, C) float32 · risk_est (B, C) float32 (content-quality / moderation estimates)
    sess_topic_engaged (B, C) float32  videos of the item's topic engaged (> 50 % watched) earlier this session
    sess_topic_skipped (B, C) float32  videos of the item's topic skipped (< 10 % watched) earlier this session

The last two are the seed's real-time adaptation as features: they change within a session as the
user engages, so the learned models react to the session without retraining.

Item ids enter through a hashed embedding table (``id_buckets`` rows). Only ids seen at least
``min_id_count`` times in training (``known_ids``, stored in the model) use it; every other id (a
brand-new video) takes the content-only path, and training drops the id path at random
(``id_dropout``) so that path is trained too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rankers.config import HEAD_INDEX, HEADS
from rankers.types import Array, Catalog
from rankers.user_model import RATE_NAMES, UserView

#: Version of the raw feature dict and of :func:`build_features`; checkpoints record it.
FEATURE_SCHEMA_VERSION = 1
MODEL_VERSION = 2
"""Version of the model architectures (2: the dual-tower pre-ranker); checkpoints of another are refused."""
MODEL_KINDS: tuple[str, ...] = ("two_tower", "preranker", "ranker")
USER_KEYS: tuple[str, ...] = ("user_emb", "cold", "session_minutes", "session_videos", "rates")
ITEM_KEYS: tuple[str, ...] = ("video_id", "topic", "format", "duration_s", "impressions", "new_creator", "promoted",
                              "item_emb", "quality_est", "risk_est", "sess_topic_engaged", "sess_topic_skipped")
N_USER_CTX = 3 + len(RATE_NAMES)
"""User context dims: cold, session minutes, session videos, rates."""
N_ITEM_DENSE = 6
"""Item dense dims besides the embedding: log duration, log impressions, new creator, promoted, quality, risk."""
N_CROSS = 3
"""Cross dims: log1p session engaged / skipped count of the item's topic, user-item embedding affinity."""

_HASH_MUL = np.uint64(0x9E3779B97F4A7C15)


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a learned model. The item-feature dims (``emb_dim``, ``n_topics``, ``n_formats``) must
    match the catalog it serves (checked on load and on the first request)."""

    kind: str
    """``two_tower``, ``preranker`` or ``ranker``."""
    emb_dim: int
    """E: dims of the content embedding and of the user estimate."""
    n_topics: int
    n_formats: int
    hidden: int = 64
    """Width of the encoders' hidden layers."""
    out_dim: int = 32
    """Two-tower output dims; encoder output dims of the ranker."""
    topic_dim: int = 8
    format_dim: int = 4
    id_buckets: int = 4096
    """Rows of the hashed item-id table."""
    id_dim: int = 16
    id_dropout: float = 0.2
    """Training probability of dropping a known id's embedding (trains the content-only path)."""
    min_id_count: int = 3
    """Training impressions an id needs to use its id embedding at serving time."""
    dropout: float = 0.1
    n_ensemble: int = 4
    """Ranker: head sets trained on bootstrap reweightings; their disagreement is the uncertainty."""
    temperature: float = 0.05
    """Two-tower softmax temperature."""

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"ModelConfig.kind={self.kind!r} is invalid: must be one of {MODEL_KINDS}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("kind",):
                continue
            if f.name in ("id_dropout", "dropout"):
                if not 0.0 <= v < 1.0:
                    raise ValueError(f"ModelConfig.{f.name}={v!r} is invalid: must be in [0, 1)")
            elif f.name == "temperature":
                if not v > 0:
                    raise ValueError(f"ModelConfig.temperature={v!r} is invalid: must be > 0")
            elif f.name == "min_id_count":
                if v < 0:
                    raise ValueError(f"ModelConfig.min_id_count={v!r} is invalid: must be >= 0")
            elif not (isinstance(v, int) and v >= 1):
                raise ValueError(f"ModelConfig.{f.name}={v!r} is invalid: must be an int >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ features
@dataclass
class Features:
    """Model inputs as tensors (B users, C candidates)."""

    user: torch.Tensor  # (B, E + N_USER_CTX) float32 user estimate and context
    item_dense: torch.Tensor  # (B, C, E + N_ITEM_DENSE) float32
    topic: torch.Tensor  # (B, C) int64
    fmt: torch.Tensor  # (B, C) int64
    id_bucket: torch.Tensor  # (B, C) int64 hashed item id
    id_known: torch.Tensor  # (B, C) float32 1 = use the id embedding
    cross: torch.Tensor  # (B, C, E + N_CROSS) float32 user x item interactions
    valid: torch.Tensor  # (B, C) bool


def hash_bucket(ids: Array, n_buckets: int) -> Array:
    """int ids -> int64 buckets in ``[0, n_buckets)`` (Fibonacci hashing; -1 -> 0)."""
    x = np.maximum(np.asarray(ids, np.int64), 0).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = (x * _HASH_MUL) >> np.uint64(32)
    return (h % np.uint64(n_buckets)).astype(np.int64)


def user_features(raw: dict[str, Array], cfg: ModelConfig) -> Array:
    """(B, E + N_USER_CTX) float32 user side of :class:`Features` from the :data:`USER_KEYS` of ``raw``."""
    ue = np.asarray(raw["user_emb"], np.float32)
    b = ue.shape[0]
    if ue.shape[1] != cfg.emb_dim:
        raise ValueError(f"user_emb has {ue.shape[1]} dims, the model expects emb_dim={cfg.emb_dim}")
    rates = np.asarray(raw["rates"], np.float32).reshape(b, len(RATE_NAMES))
    return np.concatenate([
        ue, np.asarray(raw["cold"], np.float32).reshape(b, 1),
        np.log1p(np.maximum(np.asarray(raw["session_minutes"], np.float32), 0)).reshape(b, 1) / 4.0,
        np.log1p(np.maximum(np.asarray(raw["session_videos"], np.float32), 0)).reshape(b, 1) / 5.0, rates], axis=1)


class KnownIds:
    """The item ids that use the id embedding, looked up through a bool table over ``[0, max id]`` (a
    gather per candidate instead of a binary search: serving looks up ~10^5 candidates a step)."""

    def __init__(self, ids: Array) -> None:
        ids = np.asarray(ids, np.int64)
        self.table = np.zeros(int(ids.max()) + 1 if ids.size else 0, bool)
        self.table[ids[ids >= 0]] = True

    def contains(self, vid: Array) -> Array:
        """Bool array of ``vid``'s shape: known ids (padding -1 and unseen ids are not)."""
        inside = (vid >= 0) & (vid < self.table.size)
        return self.table.take(np.where(inside, vid, 0)) & inside if self.table.size else np.zeros(vid.shape, bool)


def build_features(raw: dict[str, Array], cfg: ModelConfig, known_ids: Array | KnownIds | None = None) -> Features:
    """The one feature builder (training and serving). ``raw``: see the module docstring;
    ``known_ids``: the ids that use the id embedding, as int64 ids or a :class:`KnownIds` (None = none)."""
    ue = np.asarray(raw["user_emb"], np.float32)
    b = ue.shape[0]
    vid = np.asarray(raw["video_id"], np.int64).reshape(b, -1)
    c = vid.shape[1]
    user = user_features(raw, cfg)

    def item(key: str) -> Array:
        return np.asarray(raw[key], np.float32).reshape(b, c)

    iemb = np.asarray(raw["item_emb"], np.float32).reshape(b, c, -1)
    if iemb.shape[2] != cfg.emb_dim:
        raise ValueError(f"item_emb has {iemb.shape[2]} dims, the model expects emb_dim={cfg.emb_dim}")
    e = cfg.emb_dim
    dense = np.empty((b, c, e + N_ITEM_DENSE), np.float32)  # filled in place: no stacked copies
    dense[..., :e] = iemb
    dense[..., e] = np.log1p(np.maximum(item("duration_s"), 0)) / 5.0
    dense[..., e + 1] = np.log1p(np.maximum(item("impressions"), 0)) / 10.0
    for j, key in enumerate(("new_creator", "promoted", "quality_est", "risk_est"), start=e + 2):
        dense[..., j] = item(key)
    cross = cross_features(ue, iemb, item("sess_topic_engaged"), item("sess_topic_skipped"))
    topic = np.clip(np.asarray(raw["topic"], np.int64).reshape(b, c), 0, cfg.n_topics - 1)
    fmt = np.clip(np.asarray(raw["format"], np.int64).reshape(b, c), 0, cfg.n_formats - 1)
    valid = vid >= 0
    if known_ids is None:
        known = np.zeros((b, c), bool)
    else:
        known = (known_ids if isinstance(known_ids, KnownIds) else KnownIds(known_ids)).contains(vid)
    return Features(
        user=torch.from_numpy(np.ascontiguousarray(user, np.float32)),
        item_dense=torch.from_numpy(np.ascontiguousarray(dense, np.float32)),
        topic=torch.from_numpy(topic), fmt=torch.from_numpy(fmt),
        id_bucket=torch.from_numpy(hash_bucket(vid, cfg.id_buckets)),
        id_known=torch.from_numpy(known.astype(np.float32)),
        cross=torch.from_numpy(np.ascontiguousarray(cross, np.float32)),
        valid=torch.from_numpy(valid))


def cross_features(user_emb: Array, item_emb: Array, engaged: Array, skipped: Array) -> Array:
    """(B, C, E + N_CROSS) float32 user x item features of :class:`Features` (``cross``) from the (B, E) user
    estimates, the (B, C, E) candidates' content embeddings and the (B, C) session counts of their topics."""
    b, c, e = item_emb.shape
    cross = np.empty((b, c, e + N_CROSS), np.float32)  # filled in place: no stacked copies
    np.multiply(item_emb, user_emb[:, None, :], out=cross[..., :e])
    cross[..., e] = np.log1p(np.maximum(engaged, 0))
    cross[..., e + 1] = np.log1p(np.maximum(skipped, 0))
    cross[..., e + 2] = np.einsum("bce,be->bc", item_emb, user_emb)
    return cross


def raw_from_rows(rows: dict[str, Array], idx: Array | None = None) -> dict[str, Array]:
    """Raw features of logged impression rows (one candidate each: C = 1), optionally a subset ``idx``.

    ``rows`` holds the keys of the raw feature dict, user-level and item-level alike, one entry per
    impression (see :data:`rankers.labels.ROW_FEATURE_KEYS`)."""
    sel = (lambda a: a) if idx is None else (lambda a: a[idx])
    out: dict[str, Array] = {k: sel(np.asarray(rows[k])) for k in USER_KEYS}
    for k in ITEM_KEYS:
        a = sel(np.asarray(rows[k]))
        out[k] = a[:, None, :] if k == "item_emb" else a[:, None]
    return out


def raw_user_from_serving(users: Array, view: UserView) -> dict[str, Array]:
    """The :data:`USER_KEYS` of the raw dict for (B',) users, from the system's view of them."""
    return {"user_emb": view.emb[users], "cold": view.cold_start[users].astype(np.float32),
            "session_minutes": view.session_minutes[users], "session_videos": view.session_videos[users],
            "rates": view.rates[users]}


def raw_from_serving(users: Array, items: Array, view: UserView, cat: Catalog) -> dict[str, Array]:
    """Raw features at serving time: (B',) users, (B', C) int32 items (-1 pads) -> the raw dict,
    from the system's view of the users and the observable catalog only."""
    safe = np.maximum(items, 0)
    topic = cat.topic.take(safe)
    se = np.take_along_axis(view.session_engaged[users], topic, axis=1)
    ss = np.take_along_axis(view.session_skipped[users], topic, axis=1)
    return {
        **raw_user_from_serving(users, view), "video_id": items.astype(np.int64), "topic": topic,
        "format": cat.format.take(safe), "duration_s": cat.duration_s.take(safe),
        "impressions": cat.impressions.take(safe), "new_creator": cat.item_is_new_creator(items).astype(np.float32),
        "promoted": cat.promoted.take(safe).astype(np.float32), "item_emb": cat.emb.take(safe, axis=0),
        "quality_est": cat.quality_est.take(safe), "risk_est": cat.risk_est.take(safe),
        "sess_topic_engaged": se, "sess_topic_skipped": ss,
    }


# ------------------------------------------------------------------------------------------------ modules
def _mlp(sizes: list[int], dropout: float = 0.0, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU(inplace=True))  # after a Linear or the encoder's sum: nothing else reads its input
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def _block(layer: nn.Linear, x: torch.Tensor, start: int) -> torch.Tensor:
    """``x`` times the columns ``start .. start + x.shape[-1]`` of ``layer``'s weight: one input block's
    share of a layer whose input is a concatenation. The shares of the user, the item and the user-item
    inputs of the interaction MLP's first layer are computed once per user, once per distinct item and
    once per candidate, then added (:meth:`MultiTaskRanker.combine`). Same function, same parameters."""
    return F.linear(x, layer.weight[:, start : start + x.shape[-1]])


def whole_vectors(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` for an elementwise ``fn`` (a sigmoid, a softplus), as a contiguous tensor of ``x``'s shape,
    computed over a buffer padded to a multiple of 64 values. torch runs such functions in SIMD vectors
    with a scalar loop for the tail, and the two differ in the last bit; with whole vectors every value
    gets the vector path, so its bits do not depend on the tensor's size (how many users a block holds)."""
    n = x.numel()
    buf = torch.zeros(-(-n // 64) * 64, dtype=x.dtype)
    buf[:n] = x.reshape(-1)
    return fn(buf)[:n].view(x.shape)


def ensemble_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over dim 0 (the M ensemble members), added member by member: the same bits for every
    shape of the other dims (a reduction kernel's order may depend on them)."""
    total = x[0].clone()
    for j in range(1, x.shape[0]):
        total += x[j]
    return total.div_(x.shape[0])


def ensemble_std(x: torch.Tensor) -> torch.Tensor:
    """Population standard deviation over dim 0 (the M members), two-pass, member by member. Equal to
    ``x.std(0, unbiased=False)`` up to float rounding; ~30x faster for a handful of members (torch's
    reduction over a short leading dim took ~1.4 ms for (4, 25, 300)) and of fixed bits (see
    :func:`ensemble_mean`)."""
    mean = ensemble_mean(x)
    return ensemble_mean((x - mean).square_()).sqrt_()


class ItemEncoder(nn.Module):
    """Item features (topic, format, dense content features) plus a gated hashed-id embedding -> (B, C, out)."""

    def __init__(self, cfg: ModelConfig, out: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.topic = nn.Embedding(cfg.n_topics, cfg.topic_dim)
        self.fmt = nn.Embedding(cfg.n_formats, cfg.format_dim)
        self.content = _mlp([cfg.emb_dim + N_ITEM_DENSE + cfg.topic_dim + cfg.format_dim, cfg.hidden, out], cfg.dropout)
        self.ids = nn.Embedding(cfg.id_buckets, cfg.id_dim)
        nn.init.normal_(self.ids.weight, std=0.01)
        self.id_proj = nn.Linear(cfg.id_dim, out, bias=False)

    def forward(self, f: Features, use_id: bool = True) -> torch.Tensor:
        x = torch.cat([f.item_dense, self.topic(f.topic), self.fmt(f.fmt)], dim=-1)
        h = self.content(x)
        if use_id:
            gate = f.id_known
            if self.training and self.cfg.id_dropout > 0:
                gate = gate * (torch.rand(gate.shape) >= self.cfg.id_dropout).float()
            h = h + gate.unsqueeze(-1) * self.id_proj(self.ids(f.id_bucket))
        return h


class TwoTower(nn.Module):
    """Retrieval: user tower (user estimate + context) and item tower (item features + ids), both
    L2-normalised; score = inner product / temperature. Each side's vector also carries its raw
    embedding (the user estimate times a learned scale; the item's content embedding), so the score
    starts from the content affinity the interest source uses and the towers learn the rest.
    Vectors have ``emb_dim + out_dim`` dims."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = _mlp([cfg.emb_dim + N_USER_CTX, cfg.hidden, cfg.out_dim], cfg.dropout)
        self.item_tower = ItemEncoder(cfg, cfg.out_dim)
        self.content_scale = nn.Parameter(torch.ones(()))
        self.register_buffer("known_ids", torch.zeros(0, dtype=torch.int64))

    def user_vec(self, f: Features | torch.Tensor) -> torch.Tensor:
        """(B, E + out_dim) unit vectors: the user estimate (scaled) beside the tower's output. ``f``:
        features, or their user side alone ((B, E + N_USER_CTX), :func:`user_features`)."""
        e = self.cfg.emb_dim
        u = f.user if isinstance(f, Features) else f
        return F.normalize(torch.cat([self.content_scale * u[:, :e], self.user_tower(u)], dim=-1), dim=-1)

    def item_vec(self, f: Features, use_id: bool = True) -> torch.Tensor:
        """(B, C, E + out_dim) unit vectors: the content embedding beside the tower's output."""
        e = self.cfg.emb_dim
        return F.normalize(torch.cat([f.item_dense[..., :e], self.item_tower(f, use_id)], dim=-1), dim=-1)

    def forward(self, f: Features, use_id: bool = True) -> torch.Tensor:
        """(B, C) logits of the candidates."""
        return torch.einsum("bd,bcd->bc", self.user_vec(f), self.item_vec(f, use_id)) / self.cfg.temperature


class PreRanker(nn.Module):
    """Stage 2: a dual-tower pre-ranker (the usual production form: pre-ranking scores thousands of
    candidates a request, so it cannot run a network per candidate). Logit of one engagement label::

        <user side, item side> + w_se log1p(session engaged on the item's topic)
                               + w_ss log1p(session skipped on it) + b
        user side = [user tower(user features), w_cross * user estimate]          (out_dim + E)
        item side = [item tower(item features and id), item content embedding]    (out_dim + E)

    so the user x item embedding product of the cross features enters through the inner product.
    Serving keeps the item side per catalog slot (:class:`rankers.serving.LearnedPreRanker`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.user_tower = _mlp([cfg.emb_dim + N_USER_CTX, cfg.hidden, cfg.out_dim], cfg.dropout)
        self.item_tower = ItemEncoder(cfg, cfg.out_dim)
        self.w_cross = nn.Parameter(torch.full((cfg.emb_dim,), 0.1))
        self.w_session = nn.Parameter(torch.zeros(2))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("known_ids", torch.zeros(0, dtype=torch.int64))

    @property
    def side_dim(self) -> int:
        """Dims of the user and item sides."""
        return self.cfg.out_dim + self.cfg.emb_dim

    def user_side(self, user: torch.Tensor) -> torch.Tensor:
        """(B, E + N_USER_CTX) user features -> (B, out_dim + E)."""
        return torch.cat([self.user_tower(user), user[:, : self.cfg.emb_dim] * self.w_cross], dim=-1)

    def item_side(self, f: Features, use_id: bool = True) -> torch.Tensor:
        """(B, C, out_dim + E): item-only (reads no user feature)."""
        return torch.cat([self.item_tower(f, use_id), f.item_dense[..., : self.cfg.emb_dim]], dim=-1)

    def session_terms(self) -> tuple[float, float, float]:
        """(w_se, w_ss, b) as floats, for serving."""
        w = self.w_session.detach()
        return float(w[0]), float(w[1]), float(self.bias.detach())

    def forward(self, f: Features, use_id: bool = True) -> torch.Tensor:
        """(B, C) logits."""
        e = self.cfg.emb_dim
        dot = torch.einsum("bd,bcd->bc", self.user_side(f.user), self.item_side(f, use_id))
        return dot + self.w_session[0] * f.cross[..., e] + self.w_session[1] * f.cross[..., e + 1] + self.bias


class MultiTaskRanker(nn.Module):
    """The seed's multi-task ranker (seeds/001 ``ContentFeedRanker``), CPU-sized.

    User, video and context encoders, cross features (user x item embedding products, session topic
    counts, affinity), an interaction MLP, and one head per signal in :data:`HEADS` order. Heads are
    an ensemble of ``n_ensemble`` head sets on the shared trunk; the prediction is their mean and
    their disagreement the uncertainty. ``forward`` returns logits (B, C, K) per member; probability
    heads are sigmoids of them, ``watch_time`` a softplus (in ``watch_time_scale_s`` units).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, o = cfg.hidden, cfg.out_dim
        self.user_encoder = _mlp([cfg.emb_dim + N_USER_CTX, h, o], cfg.dropout, last_act=True)
        self.video_encoder = ItemEncoder(cfg, o)
        self.context_encoder = _mlp([cfg.emb_dim + N_CROSS, 16], 0.0, last_act=True)
        self.interaction = _mlp([o + o + 16 + cfg.emb_dim + N_CROSS, 2 * h, h], cfg.dropout, last_act=True)
        self.heads = nn.Linear(h, cfg.n_ensemble * len(HEADS))
        self.video_act = nn.ReLU(inplace=True)  # no parameters: checkpoints are unchanged
        self.register_buffer("known_ids", torch.zeros(0, dtype=torch.int64))

    @property
    def first_layer(self) -> nn.Linear:
        """The interaction MLP's first layer, the one whose input blocks are computed apart (:func:`_block`)."""
        return cast(nn.Linear, self.interaction[0])  # _mlp starts with a Linear; Sequential's items are typed Module

    def user_terms(self, user: torch.Tensor) -> torch.Tensor:
        """(B, 2 hidden): the users' share of the interaction MLP's first layer, from (B, E + N_USER_CTX) user
        features, once per user (not per candidate)."""
        return _block(self.first_layer, self.user_encoder(user), 0)

    def item_terms(self, f: Features, use_id: bool = True) -> torch.Tensor:
        """(B, C, 2 hidden): the items' share of the interaction MLP's first layer, from item features alone
        (the video encoder's output through its block of the weight). Serving computes it once per
        distinct item of a request batch (:class:`rankers.serving.LearnedScorer`), not per candidate."""
        return _block(self.first_layer, self.video_act(self.video_encoder(f, use_id)), self.cfg.out_dim)

    def combine(self, user_terms: torch.Tensor, item_terms: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """(M, B, C, K) raw outputs of the M ensemble members from the users' (B, 2 hidden) and the candidates'
        (B, C, 2 hidden) shares of the first layer and the (B, C, E + N_CROSS) cross features. ``item_terms``
        must be contiguous and is overwritten (its memory becomes the first layer's output)."""
        b, c = cross.shape[:2]
        first = self.first_layer
        x = torch.cat([self.context_encoder(cross), cross], dim=-1).view(b * c, -1)
        h = item_terms.add_((user_terms + first.bias).unsqueeze(1))  # in place: the caller's fresh tensor
        h.view(b * c, -1).addmm_(x, first.weight[:, 2 * self.cfg.out_dim :].t())  # + the candidates' share
        shared = self.interaction[1:](h)
        out = self.heads(shared).view(b, c, self.cfg.n_ensemble, len(HEADS))
        return out.permute(2, 0, 1, 3)

    def forward(self, f: Features, use_id: bool = True) -> torch.Tensor:
        """(M, B, C, K) raw outputs of the M ensemble members."""
        return self.combine(self.user_terms(f.user), self.item_terms(f, use_id), f.cross)

    @staticmethod
    def activate(raw: torch.Tensor) -> torch.Tensor:
        """Raw outputs (..., K) -> head values (a contiguous tensor of the same shape): sigmoid for
        probabilities, softplus for watch time."""
        wt = HEAD_INDEX["watch_time"]
        out = whole_vectors(torch.sigmoid, raw)  # the bits of every value, whatever the size (whole_vectors)
        out[..., wt] = whole_vectors(F.softplus, raw[..., wt])  # on a contiguous copy: a strided one runs ~9x slower
        return out


def make_model(cfg: ModelConfig) -> nn.Module:
    """A fresh model of ``cfg.kind``."""
    if cfg.kind == "two_tower":
        return TwoTower(cfg)
    if cfg.kind == "preranker":
        return PreRanker(cfg)
    return MultiTaskRanker(cfg)


def set_known_ids(model: nn.Module, video_id: Array, min_count: int) -> Array:
    """Stores the ids seen at least ``min_count`` times in ``video_id`` as the model's ``known_ids``."""
    ids, cnt = np.unique(np.asarray(video_id, np.int64), return_counts=True)
    known = ids[(cnt >= max(min_count, 1)) & (ids >= 0)]
    model.known_ids = torch.from_numpy(known.astype(np.int64))
    return known


def known_ids_of(model: nn.Module) -> Array:
    known = model.known_ids
    if not isinstance(known, torch.Tensor):
        raise TypeError(f"{type(model).__name__}.known_ids is a {type(known).__name__}, not the id buffer")
    return known.numpy()


def model_config(model: nn.Module) -> ModelConfig:
    """The :class:`ModelConfig` ``model`` (a :func:`make_model` model) was built from."""
    cfg = getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"{type(model).__name__} has no ModelConfig cfg: not a rankers.models model")
    return cfg


def item_side_vectors(model: nn.Module, side: Callable[[Features], torch.Tensor], cat: Catalog, dim: int,
                      ids: Array | None = None, block: int = 65536, known: KnownIds | None = None) -> Array:
    """(n, dim) float32 vectors ``side(features)`` of the catalog items ``ids`` (all ``n_items`` if None),
    computed in blocks from item features alone (the user side is an :class:`EmptyUserView`): the
    two-tower's item tower for the index, the pre-ranker's item side for its cache, the ranker's item
    terms of a request batch. ``known``: the model's known ids, if the caller keeps them."""
    all_ids = np.arange(cat.n_items, dtype=np.int32) if ids is None else np.asarray(ids, np.int32)
    n = all_ids.size
    out = np.empty((n, dim), np.float32)
    mc = model_config(model)
    empty = EmptyUserView(cat.n_topics, mc.emb_dim)
    was = model.training
    if was:  # serving models are in eval mode already: switching walks every submodule (~1 ms a call)
        model.eval()
    known = KnownIds(known_ids_of(model)) if known is None else known
    with torch.no_grad():
        for s in range(0, n, block):
            part = all_ids[None, s : s + block]
            # EmptyUserView holds the UserView fields raw_from_serving reads (one user, empty context)
            raw = raw_from_serving(np.zeros(1, np.int64), part, empty, cat)  # type: ignore[arg-type]
            f = build_features(raw, mc, known)
            out[s : s + part.shape[1]] = side(f)[0].numpy()
    if was:
        model.train()
    return out


def item_tower_embeddings(model: TwoTower, cat: Catalog, use_id: bool = True, block: int = 65536,
                          ids: Array | None = None) -> Array:
    """(n, emb_dim + out_dim) float32 item-tower vectors of the catalog items ``ids`` (all
    ``n_items`` items if None), for a faiss index."""
    return item_side_vectors(model, lambda f: model.item_vec(f, use_id), cat, model.cfg.emb_dim + model.cfg.out_dim,
                             ids, block)


class EmptyUserView:
    """A one-user view with empty context: the item tower does not read the user side."""

    def __init__(self, n_topics: int, emb_dim: int) -> None:
        self.emb = np.zeros((1, emb_dim), np.float32)
        self.cold_start = np.zeros(1, bool)
        self.session_minutes = np.zeros(1, np.float32)
        self.session_videos = np.zeros(1, np.float32)
        self.rates = np.zeros((1, len(RATE_NAMES)), np.float32)
        self.session_engaged = np.zeros((1, n_topics), np.float32)
        self.session_skipped = np.zeros((1, n_topics), np.float32)
