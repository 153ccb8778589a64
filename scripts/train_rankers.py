"""Train the learned pipeline models from logs and print their report.

Stages: (1) logged impressions (a dataset from ``scripts/collect.py``, one collected here with the
truncated-normal behaviour policy, or a KuaiRand-Pure CSV); (2) impression rows with the features the
system saw when serving, split by user; (3) the two-tower retrieval model, the pre-ranker and the
multi-task ranker, with progress bars, metrics to the sink, checkpoints with their config in
``runs/rankers/<preset>/``; (4) the model report:

- per head AUC and calibration error on held-out users' logged impressions, with new-video (ids not in
  the training rows), cold-video (fewer than ``cold_impressions`` logged impressions when served) and
  new-user (cold-start) slices, beside base-rate predictors;
- a shadow evaluation in the same world with held-out users (a user stream training never saw): the
  pipeline serves with the noisy-oracle scorer at its default quality, and at every stage-3 call the
  learned ranker scores the same candidates; per head AUC / calibration of both (and of the world's
  true expectation, the ceiling) on the impressions shown, with slices;
- retrieval recall@K of the two-tower against the true top-K of the hidden world (seed-weighted true
  heads over the whole catalog), beside the content-embedding interest source and random; recall of
  an approximate (faiss IVF) index against exact inner-product search; hit rate@K of held-out logged
  engagements.

    python scripts/train_rankers.py --preset tiny
    python scripts/train_rankers.py --preset small --users 128 --steps 400
    python scripts/train_rankers.py --kuairand path/to/log_standard_4_08_to_4_21_pure.csv
    python scripts/train_rankers.py --prune-cache   # drop the env cache's entries built by other code
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import faiss
import numpy as np
import tyro

from agents.threads import one_thread_default
from envs.config import FeedConfig, make_config
from envs.simulator import FeedSimulator
from offline_data.provision import RankerTraining, cache_root, prune_cache
from offline_data.ranker_rows import catalog_snapshot, collect_rows, dataset_rows
from rankers.config import HEADS, N_KNOBS
from rankers.fileio import atomic_write
from rankers.labels import HEAD_LABEL, engaged_label, head_labels, split_rows_by_user
from rankers.model_eval import (
    auc,
    evaluate_heads,
    expected_calibration_error,
    hit_rate_at_k,
    predict_rows,
    recall_at_k,
    user_tower_vectors,
)
from rankers.model_files import save_models
from rankers.models import item_tower_embeddings
from rankers.ranking import NoisyOracleScorer
from rankers.serving import LearnedScorer, user_tower_query
from rankers.training import train_models
from rankers.types import Array, Catalog

LABELS = tuple(HEAD_LABEL.values())
HELD_OUT_USER_STREAM = 0xE7A1
"""Child stream of the seed that draws the shadow evaluation's users (never used for training)."""


@dataclass
class Args:
    preset: str = "tiny"
    """World preset: tiny, small, default, large (also names the checkpoint directory)."""
    dataset: Path | None = None
    """A logged dataset directory (``scripts/collect.py``); None = collect one here."""
    kuairand: Path | None = None
    """A KuaiRand-Pure interaction-log CSV to train on instead (no simulator evaluation then)."""
    training: Annotated[RankerTraining, tyro.conf.OmitArgPrefixes] = field(default_factory=RankerTraining)
    """Collection (when no dataset is given: ``--users``, ``--steps``, ``--sigma``), ``--seed`` (also of the
    split) and training (``--epochs``, ``--batch-size``, ``--lr``, ``--hidden``); the env's cache uses the same."""
    val_fraction: float = 0.2
    """Share of users held out."""
    eval_users: int = 32
    """Shadow evaluation: held-out users stepped together."""
    eval_steps: int = 60
    """Shadow evaluation: requests per user."""
    recall_k: int = 100
    """K of retrieval recall@K."""
    out: Path = Path("runs/rankers")
    """Checkpoints and report go to ``out/<preset>/``."""
    progress: bool = True
    wandb_mode: str = "disabled"
    """online | offline | disabled."""
    prune_cache: bool = False
    """Only clean the env's learned-ranker cache (``$FEEDGYM_CACHE``, else ``~/.cache/feedgym/rankers``): remove the
    entries other code built and the leftovers of killed builds (``offline_data.provision.prune_cache``), list
    them, exit."""


# ------------------------------------------------------------------------------------------------ data
def get_rows(args: Args, cfg: FeedConfig | None) -> tuple[dict[str, Array], dict[str, Any]]:
    if args.kuairand is not None:
        from rankers.kuairand import load_kuairand

        rows = load_kuairand(args.kuairand)
        return rows, {"source": "kuairand", "path": str(args.kuairand)}
    assert cfg is not None
    if args.dataset is None:
        t = args.training
        return collect_rows(cfg, t.users, t.steps, t.sigma, t.seed, args.progress)
    from offline_data.dataset import load_dataset

    ds = load_dataset(args.dataset, expected_config=cfg)
    rows, late = dataset_rows(ds, cfg, int(ds.meta["seed"]))
    return rows, {"source": "dataset", "path": str(args.dataset), "seed": ds.meta["seed"],
                  "videos_after_snapshot": late}


# ------------------------------------------------------------------------------------------------ shadow eval
class ShadowScorer:
    """Serves with ``serving``'s output; records, per user slot and item, ``serving``'s heads, the
    learned ranker's heads and the world's truth at scoring time."""

    def __init__(self, serving: Any, learned: LearnedScorer, truth: Any) -> None:
        self.serving, self.learned, self.truth = serving, learned, truth
        self.table: dict[tuple[int, int], tuple[Array, Array, Array]] = {}
        self.seconds = 0.0
        self.calls = 0

    def score(self, users: Array, items: Array, view: Any, cat: Catalog) -> tuple[Array, Array]:
        heads, unc = self.serving.score(users, items, view, cat)
        t0 = time.perf_counter()
        lh, _ = self.learned.score(users, items, view, cat)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        tr = self.truth(users, items)
        tr[..., HEADS.index("watch_time")] /= self.learned.cfg.watch_time_scale_s
        for i, u in enumerate(users):
            for j in np.flatnonzero(items[i] >= 0):
                self.table[(int(u), int(items[i, j]))] = (heads[i, j], lh[i, j], tr[i, j])
        return heads, unc


def shadow_eval(cfg: FeedConfig, seed: int, ranker: Any, tower: Any, known_videos: set[int], args: Args,
                ) -> dict[str, Any]:
    """Held-out users in the training world: side-by-side head metrics and retrieval recall."""
    sim = FeedSimulator(cfg, args.eval_users, seed=seed)
    sim.rng_users = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(HELD_OUT_USER_STREAM,)))
    learned = LearnedScorer(ranker, cfg.pipeline)
    shadow = ShadowScorer(NoisyOracleScorer(sim._truth, cfg.pipeline), learned, sim._truth)
    sim.pipeline.scorer = shadow
    sim.reset()
    zero = np.zeros((args.eval_users, N_KNOBS), np.float32)
    keys = ("noisy", "learned", "truth", "y", "cold", "new_video", "cold_video")
    recs: dict[str, list[Array]] = {kk: [] for kk in keys}
    rec_tt, rec_content, rec_rand, rec_ivf = [], [], [], []
    k = args.recall_k
    rng = np.random.default_rng(seed)
    for t in range(args.eval_steps):
        cold = sim.view.cold_start.copy()
        imp_before = sim.corpus.catalog.impressions.copy()
        res = sim.step(zero)
        slate, resp = res.info["slate"], res.info["responses"]
        m = resp["shown"] & (slate.item >= 0)
        for u, s in zip(*np.nonzero(m)):
            key = (int(u), int(slate.item[u, s]))
            if key not in shadow.table:  # promoted insertions are not scored by stage 3
                continue
            nh, lh, th = shadow.table[key]
            recs["noisy"].append(nh)
            recs["learned"].append(lh)
            recs["truth"].append(th)
            recs["y"].append(head_labels({lab: resp[lab][u, s : s + 1] for lab in LABELS},
                                         cfg.pipeline.watch_time_scale_s)[0])
            recs["cold"].append(bool(cold[u]))
            recs["new_video"].append(key[1] not in known_videos)
            recs["cold_video"].append(bool(imp_before[key[1]] < cfg.pipeline.cold_impressions))
        if t % 10 == 9 or t == args.eval_steps - 1:  # retrieval against the world's true top-K
            cat = sim.corpus.catalog
            n = cat.n_items
            users = np.arange(args.eval_users)
            all_items = np.broadcast_to(np.arange(n, dtype=np.int32), (users.size, n))
            true = sim._truth(users, all_items)
            true[..., HEADS.index("watch_time")] /= cfg.pipeline.watch_time_scale_s
            true_score = true @ np.asarray(cfg.pipeline.ranking_weights, np.float32)
            top_true = np.argpartition(-true_score, k - 1, axis=1)[:, :k]
            ivecs = item_tower_embeddings(tower, cat)
            uvec = user_tower_query(tower, users, sim.view)
            flat = faiss.IndexFlatIP(ivecs.shape[1])
            flat.add(ivecs)
            _, top_tt = flat.search(uvec, k)
            content = sim.view.emb @ cat.emb[:n].T
            top_c = np.argpartition(-content, k - 1, axis=1)[:, :k]
            rec_tt.append(recall_at_k(top_tt, top_true))
            rec_content.append(recall_at_k(top_c, top_true))
            rec_rand.append(recall_at_k(rng.choice(n, (users.size, k)), top_true))
            nlist = max(4, int(np.sqrt(n)))
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(ivecs.shape[1]), ivecs.shape[1], nlist,
                                     faiss.METRIC_INNER_PRODUCT)
            ivf.train(ivecs)
            ivf.add(ivecs)
            ivf.nprobe = max(1, nlist // 8)
            _, top_ivf = ivf.search(uvec, k)
            rec_ivf.append(recall_at_k(top_ivf, top_tt))
    # single-request latency of the learned ranker on (1, C) candidates
    c = min(300, sim.corpus.catalog.n_items)
    items = rng.choice(sim.corpus.catalog.n_items, (1, c), replace=False).astype(np.int32)
    lat = []
    for _ in range(60):
        t0 = time.perf_counter()
        learned.score(np.zeros(1, np.int64), items, sim.view, sim.corpus.catalog)
        lat.append(1e3 * (time.perf_counter() - t0))
    a = {kk: np.asarray(v) for kk, v in recs.items()}
    slices = {"all": np.ones(a["cold"].size, bool), "new_video": a["new_video"], "cold_video": a["cold_video"],
              "new_user": a["cold"]}
    heads: dict[str, Any] = {}
    for sname, msk in slices.items():
        heads[sname] = {"n_rows": int(msk.sum())}
        if msk.sum() == 0:
            continue
        for pname in ("learned", "noisy", "truth"):
            heads[sname][pname] = evaluate_heads(a[pname][msk], a["y"][msk])
    return {
        "n_rows": int(a["cold"].size), "heads": heads,
        "learned_scorer_ms_per_call": 1e3 * shadow.seconds / max(shadow.calls, 1),
        "latency_1_request": {"candidates": c, "p50_ms": float(np.percentile(lat[10:], 50)),
                              "p99_ms": float(np.percentile(lat[10:], 99))},
        "retrieval": {"k": k, "two_tower_vs_true": float(np.mean(rec_tt)),
                      "content_interest_vs_true": float(np.mean(rec_content)),
                      "random_vs_true": float(np.mean(rec_rand)), "ivf_vs_exact_two_tower": float(np.mean(rec_ivf))},
    }


# ------------------------------------------------------------------------------------------------ report
def logged_eval(rows: dict[str, Array], val: Array, train: Array, ranker: Any, pre: Any, tower: Any,
                cat: Catalog | None, watch_scale: float, k: int, cold_impressions: float = 50.0) -> dict[str, Any]:
    """Held-out users' logged impressions: ranker heads vs base rates, pre-ranker, two-tower hit rate."""
    y = head_labels({kk: np.asarray(rows[kk])[val] for kk in LABELS}, watch_scale)
    pred = predict_rows(ranker, rows, val)
    ytr = head_labels({kk: np.asarray(rows[kk])[train] for kk in LABELS}, watch_scale)
    base = np.broadcast_to(ytr.mean(0), pred.shape)
    train_ids = np.unique(np.asarray(rows["video_id"])[train])
    new_video = ~np.isin(np.asarray(rows["video_id"])[val], train_ids)
    cold = np.asarray(rows["cold"])[val] > 0.5
    out: dict[str, Any] = {"n_rows": int(val.size), "heads": {}}
    cold_video = np.asarray(rows["impressions"])[val] < cold_impressions
    for sname, m in (("all", np.ones(val.size, bool)), ("new_video", new_video), ("cold_video", cold_video),
                     ("new_user", cold)):
        out["heads"][sname] = {"n_rows": int(m.sum())}
        if m.sum():
            out["heads"][sname]["learned"] = evaluate_heads(pred[m], y[m])
            out["heads"][sname]["base_rate"] = evaluate_heads(base[m], y[m])
    pp = predict_rows(pre, rows, val)
    lab = np.asarray(rows["complete"])[val]
    out["preranker"] = {"label": "complete", "auc": auc(lab, pp), "ece": expected_calibration_error(pp, lab),
                        "ranker_auc": auc(lab, pred[:, HEADS.index("p_complete")])}
    if cat is not None:  # hit rate@K of held-out engagements among the snapshot catalog
        pos = val[engaged_label({kk: np.asarray(rows[kk])[val] for kk in ("complete", "like", "share", "follow",
                                                                          "watch_frac")})]
        pos = pos[: 4000]
        ivecs = item_tower_embeddings(tower, cat)
        uvec = user_tower_vectors(tower, rows, pos)
        index = faiss.IndexFlatIP(ivecs.shape[1])
        index.add(ivecs)
        _, top = index.search(uvec, k)
        content = np.asarray(rows["user_emb"])[pos] @ cat.emb[: cat.n_items].T
        top_c = np.argpartition(-content, k - 1, axis=1)[:, :k]
        target = np.asarray(rows["video_id"])[pos]
        out["retrieval_logged"] = {"k": k, "n": int(pos.size), "two_tower_hit_rate": hit_rate_at_k(top, target),
                                   "content_hit_rate": hit_rate_at_k(top_c, target),
                                   "random_hit_rate": k / cat.n_items}
    return out


def _fmt(x: float) -> str:
    return "  —  " if x is None or not np.isfinite(x) else f"{x:.3f}"


def heads_table(block: dict[str, Any], names: tuple[str, ...]) -> list[str]:
    cols = " | ".join(f"{n} AUC | {n} ECE" for n in names)
    lines = [f"| head | {cols} |", "|---|" + "---|" * (2 * len(names))]
    for h in HEADS:
        cells = " | ".join(f"{_fmt(block[n][h]['auc'])} | {_fmt(block[n][h]['ece'])}" for n in names)
        lines.append(f"| {h} | {cells} |")
    return lines


def render_model_report(report: dict[str, Any]) -> str:
    lines = [f"# Learned rankers: model report ({report['preset']})", "",
             f"Data: {json.dumps(report['data'])}. Train rows {report['split']['train_rows']}, held-out rows "
             f"{report['split']['val_rows']} ({report['split']['val_users']} held-out users).", ""]
    lg = report["logged"]
    for sname in ("all", "new_video", "cold_video", "new_user"):
        blk = lg["heads"][sname]
        lines += [f"## Held-out users, logged impressions: {sname} ({blk['n_rows']} rows)", ""]
        if "learned" in blk:
            lines += [*heads_table(blk, ("learned", "base_rate")), ""]
    lines += [f"Pre-ranker (p_complete): AUC {_fmt(lg['preranker']['auc'])}, ECE {_fmt(lg['preranker']['ece'])} "
              f"(ranker's p_complete AUC {_fmt(lg['preranker']['ranker_auc'])}).", ""]
    if "retrieval_logged" in lg:
        r = lg["retrieval_logged"]
        lines += [f"Logged engagements of held-out users, hit rate@{r['k']} ({r['n']} rows): two-tower "
                  f"{_fmt(r['two_tower_hit_rate'])}, content inner product {_fmt(r['content_hit_rate'])}, random "
                  f"{_fmt(r['random_hit_rate'])}.", ""]
    sh = report.get("shadow")
    if sh:
        for sname in ("all", "new_video", "cold_video", "new_user"):
            blk = sh["heads"][sname]
            lines += [f"## Shadow evaluation, held-out users in the same world: {sname} ({blk['n_rows']} impressions)",
                      ""]
            if "learned" in blk:
                lines += [*heads_table(blk, ("learned", "noisy", "truth")), ""]
        r = sh["retrieval"]
        lines += [f"Retrieval recall@{r['k']} against the world's true top-{r['k']}: two-tower "
                  f"{_fmt(r['two_tower_vs_true'])}, content-embedding interest source "
                  f"{_fmt(r['content_interest_vs_true'])}, random {_fmt(r['random_vs_true'])}; faiss IVF vs exact "
                  f"search on the two-tower vectors {_fmt(r['ivf_vs_exact_two_tower'])}.", "",
                  f"Learned scorer: {sh['learned_scorer_ms_per_call']:.2f} ms per stage-3 call "
                  f"(all users of a refresh at once); one request of {sh['latency_1_request']['candidates']} "
                  f"candidates: p50 {sh['latency_1_request']['p50_ms']:.2f} ms, "
                  f"p99 {sh['latency_1_request']['p99_ms']:.2f} ms.", ""]
    lines += [f"Training seconds: {json.dumps(report['train_seconds'])}", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ main
def main(args: Args) -> dict[str, Any]:
    if args.prune_cache:
        gone = prune_cache()
        for path in gone:
            print(f"removed {path}")
        print(f"{len(gone)} removed from {cache_root()}")
        return {"pruned": [str(p) for p in gone]}
    cfg = make_config(args.preset) if args.kuairand is None else None
    name = args.preset if args.kuairand is None else "kuairand"
    out = args.out / name
    out.mkdir(parents=True, exist_ok=True)
    from agents.sinks import make_sink

    sink = make_sink(args.wandb_mode, out_dir=out if args.wandb_mode != "disabled" else None, project="feedgym",
                     config={k: str(v) for k, v in asdict(args).items()}, group="rankers", job_type="train_rankers")
    rows, src = get_rows(args, cfg)
    seed = args.training.seed
    train, val = split_rows_by_user(np.asarray(rows["user_id"]), args.val_fraction, seed)
    if cfg is not None:
        emb_dim, n_topics, n_formats = cfg.corpus.emb_dim, cfg.corpus.n_topics, cfg.corpus.n_formats
        scale = cfg.pipeline.watch_time_scale_s
    else:
        emb_dim = np.asarray(rows["user_emb"]).shape[1]
        n_topics = int(np.asarray(rows["topic"]).max()) + 1
        n_formats = int(np.asarray(rows["format"]).max()) + 1
        scale = 30.0
    tc = args.training.train_config(scale, args.progress)
    models, secs = train_models(rows, {"emb_dim": emb_dim, "n_topics": n_topics, "n_formats": n_formats}, tc,
                                idx=train, hidden=args.training.hidden, log=sink.log)
    save_models(out, models, name, train_config=asdict(tc), data=src,
                split={"by": "user", "val_fraction": args.val_fraction, "seed": seed})
    known = set(np.unique(np.asarray(rows["video_id"])[train]).tolist())
    cat = catalog_snapshot(cfg, int(src["seed"])) if cfg is not None else None
    report: dict[str, Any] = {
        "preset": name, "data": src, "train_seconds": secs,
        "split": {"train_rows": int(train.size), "val_rows": int(val.size),
                  "val_users": int(np.unique(np.asarray(rows["user_id"])[val]).size)},
        "logged": logged_eval(rows, val, train, models["ranker"], models["preranker"], models["two_tower"], cat, scale,
                              args.recall_k),
    }
    if cfg is not None and args.eval_steps > 0:
        report["shadow"] = shadow_eval(cfg, int(src["seed"]), models["ranker"], models["two_tower"],
                                       known, args)  # type: ignore[arg-type]
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=float).encode())
    text = render_model_report(report)
    atomic_write(out / "report.md", text.encode())
    print(text)
    print(f"checkpoints and report in {out}")
    sink.finish()
    return report


if __name__ == "__main__":
    one_thread_default()
    main(tyro.cli(Args))
