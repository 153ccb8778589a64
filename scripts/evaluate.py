"""Off-policy evaluation from logged data, printed beside the on-policy truth from the simulator.

Loads a logged dataset (or collects one: ``GaussianKnobs(sigma)`` around the weighted-sum baseline,
one H-request episode per user), estimates the H-request discounted value of each target policy
from the logs alone with IS, WIS, DR and FQE (``agents/ope.py``), then runs each target in the
simulator on the dataset's seed (the same users) for the truth with a 95 % bootstrap interval, and
prints every estimator's error. Writes ``ope.json`` and ``ope_vs_truth.png`` to ``--out``.

    python scripts/evaluate.py --preset tiny --users 64 --horizon 50
    python scripts/evaluate.py --dataset runs/datasets/tiny-gaussian-s0 --ppo runs/main/ppo --cql runs/main/cql
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from agents import ope
from agents.loading import load_agent
from agents.policies import ConstantKnobs, Policy, make_baseline
from agents.report import save_figure
from agents.rollouts import models_for
from agents.stats import bootstrap_ci
from agents.threads import one_thread_default
from envs.config import FeedConfig, make_config
from offline_data import GaussianKnobs, LoggedDataset, collect, load_dataset, read_dataset_meta, select_episodes
from offline_data.executor import exit_on_sigterm, make_executor
from offline_data.provision import learned_models
from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.fileio import atomic_write

ESTIMATORS = ("IS", "WIS", "DR", "FQE")


@dataclass
class Args:
    preset: str = "tiny"
    """World preset for a collected dataset (ignored with --dataset: the dataset's own preset is used)."""
    dataset: Path | None = None
    """A logged dataset directory (``scripts/collect.py``); None = collect one here."""
    users: int = 64
    """Users (simulator slots) of a collected dataset; the truth always uses the dataset's own count."""
    reward: str | None = None
    """Reward mode of a collected dataset (envs.config.REWARD_MODES: retention, engagement, composite, churn,
    churn_expected); None = the preset's."""
    behaviour_sigma: float = 0.3
    """Std of the truncated-normal knob noise of the collected dataset's behaviour policy."""
    seed: int = 0
    """Seed of a collected dataset (the truth uses the dataset's seed)."""
    horizon: int = 50
    """H: requests per user's episode that count (steps >= H are dropped)."""
    gamma: float = 0.99
    """Discount of the H-request value."""
    sigma: float = 0.3
    """Smoothing std of deterministic continuous targets for IS/WIS/DR (truncated normal per knob)."""
    epsilon: float = 0.1
    """Exploration of the epsilon-greedy target on discrete (preset) data."""
    policies: tuple[str, ...] = ("behaviour", "weighted_sum", "random", "true_scores", "constant")
    """Targets: behaviour (the logger itself, a sanity row), weighted_sum, engagement, random, true_scores, constant."""
    constant: tuple[str, ...] = ("explore_share=0.3", "diversity_strength=0.3")
    """Knobs of the ``constant`` target as ``name=value`` (others 0)."""
    ppo: Path | None = None
    """A PPO checkpoint directory to evaluate too (``agents.ppo.load_ppo``)."""
    cql: Path | None = None
    """A CQL checkpoint directory to evaluate too (``agents.cql.load_cql``)."""
    fqe_hidden: int = 64
    """FQE MLP width."""
    fqe_iters: int | None = None
    """FQE regression rounds (None = 2 x horizon; H is the backward-induction depth)."""
    fqe_steps: int = 20
    """Adam steps per FQE round."""
    dr_samples: int = 16
    """Action draws per state for DR's ``v(s) = E_pi Q(s, a)`` (continuous targets)."""
    bootstrap_reps: int = 2000
    """Bootstrap resamples for the truth's interval."""
    out: Path = Path("runs/evaluate")
    """Output directory for ope.json and ope_vs_truth.png."""
    executor: Literal["local", "ray"] = "local"
    """Where the targets' estimates and truths run: in this process, or on Ray (offline_data.executor)."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine)."""


def _constant(spec: tuple[str, ...]) -> ConstantKnobs:
    a = np.zeros(N_KNOBS, np.float32)
    for item in spec:
        name, _, val = item.partition("=")
        if name not in KNOB_NAMES:
            raise ValueError(f"--constant: unknown knob {name!r}; knobs are {KNOB_NAMES}")
        try:
            v = float(val)
        except ValueError:
            raise ValueError(f"--constant {item!r}: the value must be a number in [-1, 1]") from None
        if not -1.0 <= v <= 1.0:  # a knob's action range (rankers/knobs.py); outside it would be clipped unseen
            raise ValueError(f"--constant {item!r}: the value must be a number in [-1, 1]")
        a[KNOB_NAMES.index(name)] = v
    return ConstantKnobs(a, name="constant")


def _targets(args: Args, ds: LoggedDataset, cfg: FeedConfig) -> list[Policy]:
    out: list[Any] = []
    for name in args.policies:
        if name == "behaviour":
            b = ope.behaviour_from_meta(ds.meta)
            if b is None:
                print(f"skipping 'behaviour': the dataset's behaviour {ds.meta.get('behaviour')} cannot be re-drawn")
                continue
            out.append(ope.SampledPolicy(b, seed=args.seed + 7, name="behaviour"))
        elif name == "constant":
            out.append(_constant(args.constant))
        else:
            out.append(make_baseline(name, seed=1000 + len(out)))
    if args.ppo is not None:
        out.append(load_agent(args.ppo, "ppo"))
    if args.cql is not None:
        out.append(load_agent(args.cql, "cql"))
    return out


def _dataset(args: Args) -> tuple[LoggedDataset, FeedConfig, str]:
    if args.dataset is not None:
        meta = read_dataset_meta(args.dataset)
        cfg = make_config(meta["preset"])
        if meta.get("config", {}).get("reward", {}).get("mode") not in (None, cfg.reward.mode):
            cfg = cfg.replace(reward={"mode": meta["config"]["reward"]["mode"]})
        learned_models(cfg)  # the on-policy truth runs the dataset's world: its learned rankers, if it has any
        return load_dataset(args.dataset, expected_config=cfg), cfg, str(args.dataset)
    cfg = make_config(args.preset, **({"reward": {"mode": args.reward}} if args.reward else {}))
    learned_models(cfg)  # the world's learned rankers, if it has any: built once, then cached
    ds = collect(GaussianKnobs(args.behaviour_sigma), cfg, n_users=args.users, n_steps=args.horizon, seed=args.seed,
                 autoreset=False)
    return ds, cfg, f"collected: GaussianKnobs({args.behaviour_sigma}) on {args.preset}, {args.users} users"


def _fmt(v: float) -> str:
    return f"{v:.3f}" if np.isfinite(v) else "nan"


def print_ope_table(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in ("policy", "truth [95% CI]", *ESTIMATORS, *(f"err {e}" for e in ESTIMATORS), "ESS"):
        t.add_column(h, justify="left" if h == "policy" else "right")
    for r in rows:
        dagger = "†" if r["env_overrides"] else ""
        truth = f"{_fmt(r['truth'])} [{_fmt(r['truth_lo'])}, {_fmt(r['truth_hi'])}]{dagger}"
        errs = [f"{r['err_' + e]:+.3f}" + ("*" if r["truth_lo"] <= r[e] <= r["truth_hi"] else "") for e in ESTIMATORS]
        t.add_row(r["policy"], truth, *(_fmt(r[e]) for e in ESTIMATORS), *errs, f"{r['ESS']:.3f}")
    Console(width=200).print(t)
    print("err = estimate - truth; * = estimate inside the truth's 95% CI; ESS = effective sample size of the "
          "full-episode IS weights / episodes; † = runs with env_overrides (the truth uses them, the logs cannot)")


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    truth = np.array([r["truth"] for r in rows])
    for k, e in enumerate(ESTIMATORS):
        ax.scatter(truth, [r[e] for r in rows], marker="os^D"[k], label=e, color=f"C{k}", zorder=3)
    ax.errorbar(truth, truth, xerr=[truth - [r["truth_lo"] for r in rows], [r["truth_hi"] for r in rows] - truth],
                fmt="none", ecolor="gray", capsize=3, zorder=2)
    for r in rows:
        ax.annotate(r["policy"], (r["truth"], r["truth"]), fontsize=7, xytext=(3, -10), textcoords="offset points")
    vals = np.array([[r[e] for e in ESTIMATORS] + [r["truth_lo"], r["truth_hi"]] for r in rows]).ravel()
    vals = vals[np.isfinite(vals)]
    lo, hi = float(vals.min()), float(vals.max())
    pad = 0.05 * (hi - lo + 1e-9)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8, label="estimate = truth")
    ax.set_xlabel("on-policy truth (95% CI)")
    ax.set_ylabel("off-policy estimate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(args: Args) -> list[dict[str, Any]]:
    if args.horizon < 1 or not 0.0 < args.gamma <= 1.0:
        raise ValueError(f"need --horizon >= 1 and 0 < --gamma <= 1, got {args.horizon}, {args.gamma}")
    if "constant" in args.policies:
        _constant(args.constant)  # a bad --constant fails before the dataset is collected
    t0 = time.perf_counter()
    ds, cfg, source = _dataset(args)
    col = ds.meta["collection"]
    n_users, seed = int(col["n_users"]), int(ds.meta["seed"])
    # the truth meets the users of the first episode in each slot: evaluate those (all, without autoreset)
    episodes = np.arange(n_users) if col["autoreset"] else None
    targets = _targets(args, ds, cfg)
    # one replay of the logging run serves every simulator-bound target (the true-scores policy)
    bound = [p for p in targets if ope.needs_simulator(p)]
    replayed = dict(zip([p.name for p in bound], ope.replay_target_actions(ds, bound, cfg))) if bound else {}
    fqe = ope.FQEParams(hidden=args.fqe_hidden, n_iters=args.fqe_iters, steps_per_iter=args.fqe_steps,
                        seed=args.seed)
    served = [cfg.replace(**p.env_overrides) if p.env_overrides else cfg for p in targets]
    shared = ope.OPESettings(ds, cfg, args.horizon, args.gamma, args.sigma, args.epsilon, fqe, episodes,
                             args.dr_samples, args.seed, models_for([cfg, *served]))
    jobs = [ope.OPETarget(pol, replayed.get(pol.name)) for pol in targets]
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        done = ex.map(ope.estimate_with_truth, jobs, common=shared, desc="targets")
    rows: list[dict[str, Any]] = []
    for pol, res in zip(targets, done, strict=True):
        est = res["estimates"]
        m, lo, hi = bootstrap_ci(res["returns"], seed=args.seed, reps=args.bootstrap_reps)
        row: dict[str, Any] = {"policy": pol.name, "target": ope.target_kind(pol, ds.discrete), "truth": m,
                               "truth_lo": lo, "truth_hi": hi, **{e: est[e] for e in ESTIMATORS},
                               **{f"err_{e}": est[e] - m for e in ESTIMATORS}, "ESS": est["ESS"],
                               "n_episodes": int(est["n_episodes"]), "env_overrides": bool(pol.env_overrides)}
        if res["returns_logged_pipeline"] is not None:
            row["truth_logged_pipeline"] = float(res["returns_logged_pipeline"].mean())
        rows.append(row)
    sel = ds if episodes is None else select_episodes(ds, episodes)
    mc = ope.logged_returns(sel, args.horizon, args.gamma)
    rmse = {e: float(np.sqrt(np.mean([r[f"err_{e}"] ** 2 for r in rows]))) if rows else float("nan")
            for e in ESTIMATORS}
    title = (f"OPE vs truth: {ds.meta['preset']}, {n_users} users, H={args.horizon}, gamma={args.gamma}, "
             f"target sigma={args.sigma}")
    print_ope_table(rows, title)
    print(f"logged behaviour Monte Carlo value: {mc.mean():.3f}; RMSE over targets: "
          + ", ".join(f"{e} {v:.3f}" for e, v in rmse.items()))
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv) if sys.argv and sys.argv[0].endswith(".py") else ""
    report = {"title": title, "command": cmd or f"scripts/evaluate.py {args}", "dataset": source,
              "behaviour": ds.meta.get("behaviour"), "counts": ds.meta.get("counts"), "seed": seed,
              "n_users": n_users, "preset": ds.meta["preset"], "discrete": ds.discrete,
              "args": {k: (str(v) if isinstance(v, Path) or v is None else v) for k, v in asdict(args).items()},
              "logged_mc": float(mc.mean()), "rmse": rmse, "rows": rows,
              "seconds": round(time.perf_counter() - t0, 2)}
    atomic_write(args.out / "ope.json", json.dumps(report, indent=1, default=float).encode())
    write_plot(rows, args.out / "ope_vs_truth.png", title)
    print(f"wrote {args.out / 'ope.json'} and {args.out / 'ope_vs_truth.png'}")
    return rows


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started (a private Ray too)
    one_thread_default()
    main(tyro.cli(Args))
