"""The main job: train a PPO agent on the feed, evaluate it against the weighted-sum baseline and
the other baselines on the same users and noise, print the comparison table, write the plots.

    python scripts/main.py            # small world, about the budget stated in README
    python scripts/main.py --quick    # a first look in about two minutes

Outputs go to ``runs/main/`` (checkpoint, report.md, results.json, PNG plots, offline wandb run).
A run that is interrupted resumes PPO from its last checkpoint when started again.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import tyro

from agents.cem import cem_tune
from agents.evaluation import evaluate, summarize
from agents.policies import ConstantKnobs, make_baseline
from agents.ppo import PPOParams, SB3Policy, train_ppo
from agents.report import print_table, write_report
from agents.sinks import make_sink
from envs.config import make_config


@dataclass
class Args:
    preset: str = "small"
    """World preset for training and evaluation."""
    timesteps: int = 200_000
    """PPO environment steps (user-requests)."""
    num_envs: int = 64
    """Simulated users stepped together during training."""
    users: int = 512
    """Evaluation users per seed (one episode each)."""
    seeds: tuple[int, ...] = (0, 1)
    """Evaluation seeds (not the training seed)."""
    train_seed: int = 12345
    """Seed of the training world and PPO."""
    baselines: tuple[str, ...] = ("weighted_sum", "engagement", "random", "oracle")
    """Baselines evaluated beside the agent."""
    out: Path = Path("runs/main")
    """Output directory."""
    wandb_mode: str = ""
    """online | offline | disabled; empty = offline unless an API key is configured."""
    quick: bool = False
    """A first look: tiny world, small budgets."""
    resume: bool = True
    """Resume PPO from ``out/ppo`` if a checkpoint is there."""
    cem: bool = True
    """Also tune a static knob vector by the cross-entropy method on the same simulation budget."""


def main(args: Args) -> list[dict]:
    if args.quick:
        args = replace(args, preset="tiny", timesteps=min(args.timesteps, 16_384), num_envs=32, users=64,
                       seeds=args.seeds[:1], out=args.out.parent / (args.out.name + "_quick"))
    if args.timesteps < 1 or args.users < 2:
        raise ValueError(f"timesteps={args.timesteps} and users={args.users} must be >= 1 and >= 2")
    cfg = make_config(args.preset)
    sink = make_sink(args.wandb_mode or os.environ.get("WANDB_MODE", "") or "offline", project="feedgym",
                     config={"args": {k: str(v) for k, v in vars(args).items()}, "env": cfg.to_dict()},
                     group=f"main-{args.preset}", job_type="main", out_dir=args.out)
    t0 = time.perf_counter()
    print(f"[1/3] training PPO on {args.preset} for {args.timesteps} steps ({args.num_envs} users at once)")
    model = train_ppo(cfg, args.timesteps, args.out / "ppo", seed=args.train_seed, num_envs=args.num_envs,
                      params=PPOParams(), sink=sink, resume=args.resume, progress=True)
    t1 = time.perf_counter()
    print(f"      trained in {t1 - t0:.0f}s")
    policies = [SB3Policy(model, "ppo"), *(make_baseline(b, seed=1000 + i) for i, b in enumerate(args.baselines))]
    if args.cem:
        print(f"[2/3] tuning a static knob vector by CEM on the same budget ({args.timesteps} steps)")
        cem = cem_tune(cfg, args.timesteps, seed=args.train_seed, progress=True)
        for h in cem.history:
            sink.log({f"train/cem_{k}": v for k, v in h.items()}, step=int(h["iter"]))
        policies.insert(1, ConstantKnobs(cem.best_action, "cem_tuned"))
        print(f"      CEM action: {[round(float(x), 2) for x in cem.best_action]}")
    t1 = time.perf_counter()
    print(f"[3/3] evaluating on {args.users} users x seeds {args.seeds}")
    comp = evaluate(policies, cfg, args.users, args.seeds)
    rows = summarize(comp)
    title = (f"feedgym main job: PPO and CEM ({args.timesteps} steps each) vs baselines — {args.preset}, "
             f"{args.users} users x {len(args.seeds)} seeds")
    print_table(rows, title)
    sink.log({f"eval/{r['metric'].replace('/', '.')}/{r['policy']}": r["mean"] for r in rows},
             step=int(model.num_timesteps))
    sink.finish()
    cmd = "python scripts/main.py" + (" --quick" if args.quick else "")
    report = write_report(comp, rows, args.out, title, cmd)
    print(f"report and plots: {report.parent}  (train+CEM {t1 - t0:.0f}s, eval {time.perf_counter() - t1:.0f}s)")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(tyro.cli(Args))
