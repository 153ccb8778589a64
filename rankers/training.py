"""Training loops of the learned models (two-tower, pre-ranker, multi-task ranker) on impression rows
(:mod:`rankers.labels`).

Reproducibility: every training function runs under :func:`torch.random.fork_rng` seeded with
``TrainConfig.seed`` (initialisation, dropout, id dropout) and draws batches from a seeded
``torch.Generator``: the same rows and seed give identical weights, and the caller's global torch
RNG is left untouched. Epochs are fixed (no early stopping)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from rankers.config import HEAD_INDEX, HEADS
from rankers.labels import HEAD_LABEL, engaged_label, head_labels, validate_rows
from rankers.models import (
    MODEL_KINDS,
    Features,
    ModelConfig,
    MultiTaskRanker,
    PreRanker,
    TwoTower,
    build_features,
    known_ids_of,
    model_config,
    raw_from_rows,
    set_known_ids,
)
from rankers.types import Array

LogFn = Callable[[dict[str, float], int], None]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters shared by the three training loops."""

    epochs: int = 5
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 1e-5
    seed: int = 0
    progress: bool = True
    """Show tqdm progress bars."""
    watch_time_scale_s: float = 30.0
    """watch_time targets are ``watch_s / watch_time_scale_s`` (as the pipeline's heads)."""
    head_loss_weights: tuple[float, ...] = (1.0,) * len(HEADS)
    """Weight of each head's loss, :data:`HEADS` order."""
    huber_delta: float = 1.0
    """watch_time loss: Huber with this delta (in scale units)."""
    bootstrap: bool = True
    """Ranker: each ensemble member weights rows by Poisson(1) draws (a bootstrap), so members disagree
    where data are scarce."""
    logq: bool = True
    """Two-tower: subtract log of each item's in-batch sampling probability (logQ correction)."""
    prerank_label: str = "complete"
    """Pre-ranker target: a boolean label key of the rows."""
    log_every: int = 20
    """Batches between two ``log`` calls."""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"TrainConfig.{name}={v!r} is invalid: must be an int >= 1")
        if len(self.head_loss_weights) != len(HEADS):
            raise ValueError(f"TrainConfig.head_loss_weights has {len(self.head_loss_weights)} entries, "
                             f"expected {len(HEADS)} (one per head {HEADS})")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} is invalid: must be > 0")


def take_features(f: Features, idx: torch.Tensor) -> Features:
    """Rows ``idx`` of every field."""
    return Features(**{k: getattr(f, k)[idx] for k in f.__dataclass_fields__})


def _prepare(model: nn.Module, rows: dict[str, Array], idx: Array | None, min_id_count: int) -> tuple[Features, Array]:
    validate_rows(rows)
    idx = np.arange(len(rows["user_id"])) if idx is None else np.asarray(idx)
    set_known_ids(model, np.asarray(rows["video_id"])[idx], min_id_count)
    f = build_features(raw_from_rows(rows, idx), model_config(model), known_ids_of(model))
    return f, idx


def _loop(model: nn.Module, n: int, tc: TrainConfig, name: str, loss_fn: Callable[[Array], tuple[torch.Tensor, dict]],
          log: LogFn | None) -> None:
    """Fixed-epoch minibatch Adam over ``n`` rows; ``loss_fn(batch_idx)`` -> (loss, named losses)."""
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    gen = torch.Generator().manual_seed(tc.seed)
    n_batches = max(1, -(-n // tc.batch_size))
    model.train()
    step = 0
    bar = tqdm(total=tc.epochs * n_batches, desc=f"train {name}", disable=not tc.progress, leave=False, unit="batch")
    for epoch in range(tc.epochs):
        perm = torch.randperm(n, generator=gen).numpy()
        for s in range(0, n, tc.batch_size):
            bi = perm[s : s + tc.batch_size]
            loss, parts = loss_fn(bi)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if log is not None and (step % tc.log_every == 0 or step == tc.epochs * n_batches):
                metrics = {f"losses/{name}_{k}": float(v) for k, v in parts.items()}
                metrics[f"losses/{name}"] = float(loss.detach())
                metrics[f"train/{name}_epoch"] = float(epoch)
                log(metrics, step)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    bar.close()
    model.eval()


def train_ranker(rows: dict[str, Array], model_cfg: ModelConfig, tc: TrainConfig | None = None,
                 idx: Array | None = None, log: LogFn | None = None) -> MultiTaskRanker:
    """Trains the multi-task ranker on rows ``idx`` (all if None): per-head BCE (Huber for watch_time),
    weighted by ``tc.head_loss_weights``, each ensemble member on its own bootstrap weights."""
    tc = tc or TrainConfig()
    if model_cfg.kind != "ranker":
        raise ValueError(f"train_ranker needs ModelConfig.kind='ranker', got {model_cfg.kind!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = MultiTaskRanker(model_cfg)
        f, idx = _prepare(model, rows, idx, model_cfg.min_id_count)
        y = torch.from_numpy(head_labels({k: np.asarray(rows[k])[idx] for k in HEAD_LABEL.values()},
                                         tc.watch_time_scale_s))
        m = model_cfg.n_ensemble
        gen = torch.Generator().manual_seed(tc.seed + 1)
        w_rows = (torch.poisson(torch.ones(m, idx.size), generator=gen) if tc.bootstrap and m > 1
                  else torch.ones(m, idx.size))
        hw = torch.tensor(tc.head_loss_weights, dtype=torch.float32)
        wt = HEAD_INDEX["watch_time"]
        prob = torch.tensor([k != wt for k in range(len(HEADS))])

        def loss_fn(bi: Array) -> tuple[torch.Tensor, dict]:
            t = torch.from_numpy(bi)
            raw = model(take_features(f, t))[:, :, 0, :]  # (M, b, K)
            yb = y[t].unsqueeze(0).expand_as(raw)
            wb = w_rows[:, t].unsqueeze(-1)  # (M, b, 1)
            bce = F.binary_cross_entropy_with_logits(raw, yb, reduction="none")
            hub = F.huber_loss(F.softplus(raw[..., wt]), yb[..., wt], delta=tc.huber_delta, reduction="none")
            per = torch.where(prob, bce, hub.unsqueeze(-1).expand_as(bce))
            per_head = (per * wb).sum(dim=(0, 1)) / wb.sum(dim=(0, 1)).clamp_min(1e-6)  # (K,)
            loss = (per_head * hw).sum()
            return loss, {h: per_head[i].detach() for i, h in enumerate(HEADS)}

        _loop(model, idx.size, tc, "ranker", loss_fn, log)
    return model


def train_preranker(rows: dict[str, Array], model_cfg: ModelConfig, tc: TrainConfig | None = None,
                    idx: Array | None = None, log: LogFn | None = None) -> PreRanker:
    """Trains the pre-ranker (BCE on ``tc.prerank_label``) on rows ``idx`` (all if None)."""
    tc = tc or TrainConfig()
    if model_cfg.kind != "preranker":
        raise ValueError(f"train_preranker needs ModelConfig.kind='preranker', got {model_cfg.kind!r}")
    if tc.prerank_label not in rows:
        raise ValueError(f"TrainConfig.prerank_label={tc.prerank_label!r} is not a key of the rows")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = PreRanker(model_cfg)
        f, idx = _prepare(model, rows, idx, model_cfg.min_id_count)
        y = torch.from_numpy(np.asarray(rows[tc.prerank_label], np.float32)[idx])

        def loss_fn(bi: Array) -> tuple[torch.Tensor, dict]:
            t = torch.from_numpy(bi)
            logit = model(take_features(f, t))[:, 0]
            loss = F.binary_cross_entropy_with_logits(logit, y[t])
            return loss, {}

        _loop(model, idx.size, tc, "preranker", loss_fn, log)
    return model


def train_two_tower(rows: dict[str, Array], model_cfg: ModelConfig, tc: TrainConfig | None = None,
                    idx: Array | None = None, log: LogFn | None = None) -> TwoTower:
    """Trains the two-tower model with in-batch negatives (sampled softmax) on the positive
    engagements (:func:`engaged_label`) among rows ``idx``. Other rows of the batch with the same
    video are masked (not negatives); with ``tc.logq`` the logits subtract ``log q(item)``, the
    item's share of the positives (popular items are over-sampled as negatives)."""
    tc = tc or TrainConfig()
    if model_cfg.kind != "two_tower":
        raise ValueError(f"train_two_tower needs ModelConfig.kind='two_tower', got {model_cfg.kind!r}")
    validate_rows(rows)
    idx = np.arange(len(rows["user_id"])) if idx is None else np.asarray(idx)
    pos = idx[engaged_label({k: np.asarray(rows[k])[idx] for k in ("complete", "like", "share", "follow",
                                                                       "watch_frac")})]
    if pos.size < 2:
        raise ValueError(f"train_two_tower needs at least 2 positive engagements, got {pos.size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tc.seed)
        model = TwoTower(model_cfg)
        set_known_ids(model, np.asarray(rows["video_id"])[idx], model_cfg.min_id_count)
        f = build_features(raw_from_rows(rows, pos), model_cfg, known_ids_of(model))
        vid = np.asarray(rows["video_id"], np.int64)[pos]
        _, inv, cnt = np.unique(vid, return_inverse=True, return_counts=True)
        logq = torch.from_numpy(np.log(cnt[inv] / vid.size).astype(np.float32))
        vid_t = torch.from_numpy(vid)

        def loss_fn(bi: Array) -> tuple[torch.Tensor, dict]:
            t = torch.from_numpy(bi)
            fb = take_features(f, t)
            u = model.user_vec(fb)
            v = model.item_vec(fb)[:, 0, :]
            logits = u @ v.T / model_cfg.temperature
            if tc.logq:
                logits = logits - logq[t][None, :]
            same = vid_t[t][:, None] == vid_t[t][None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(t.numel()))
            return loss, {}

        _loop(model, pos.size, tc, "two_tower", loss_fn, log)
    return model


TRAINERS: dict[str, Callable[..., nn.Module]] = {"two_tower": train_two_tower, "preranker": train_preranker,
                                                 "ranker": train_ranker}


def train_models(rows: dict[str, Array], dims: dict[str, int], tc: TrainConfig, idx: Array | None = None,
                 hidden: int = 64, log: LogFn | None = None, kinds: tuple[str, ...] = MODEL_KINDS,
                 ) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Trains the pipeline's models of ``kinds`` on rows ``idx`` (all if None), in that order.

    Args:
        dims: the item-feature dims ``emb_dim``, ``n_topics``, ``n_formats`` of the catalog served.
        hidden: width of every model's hidden layers.
        log: metrics callback; each model's steps are offset by 100,000 so curves do not overlap.

    Returns:
        ``({kind: model in eval mode}, {kind: training seconds})``. The hashed id table has the
        smallest power of two >= max(1024, 2 x distinct video ids) rows.
    """
    id_buckets = int(2 ** np.ceil(np.log2(max(1024, 2 * np.unique(np.asarray(rows["video_id"])).size))))
    models: dict[str, nn.Module] = {}
    secs: dict[str, float] = {}
    for i, kind in enumerate(kinds):
        mc = ModelConfig(kind=kind, emb_dim=dims["emb_dim"], n_topics=dims["n_topics"], n_formats=dims["n_formats"],
                         hidden=hidden, id_buckets=id_buckets)
        step_log = None if log is None else (lambda m, step, off=100_000 * i: log(m, off + step))
        t0 = time.perf_counter()
        models[kind] = TRAINERS[kind](rows, mc, tc, idx=idx, log=step_log)
        secs[kind] = round(time.perf_counter() - t0, 2)
    return models, secs
