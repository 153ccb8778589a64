"""The main job: log a dataset with a randomized weighted-sum behaviour policy, train PPO (online)
and CQL (offline, on that dataset), tune a static knob vector by CEM on the same budget, evaluate
everything against the weighted-sum baseline on the same users and noise, print the comparison
table, write the plots.

    python scripts/main.py            # small world, about the budget stated in README
    python scripts/main.py --quick    # a first look in about two minutes

Outputs go to ``runs/main/`` (checkpoint, report.md, results.json, PNG plots, offline wandb run).
A run that is interrupted resumes when started again: the dataset is reused if it loads and
matches the config, PPO and CQL continue from their last checkpoints.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import tyro

from agents.cem import cem_tune
from agents.cql import CQLParams, D3RLPolicy, train_cql
from agents.evaluation import evaluate, summarize
from agents.policies import ConstantKnobs, make_baseline
from agents.ppo import PPOParams, SB3Policy, train_ppo
from agents.report import print_table, write_report
from agents.sinks import make_sink
from envs.config import FeedConfig, make_config
from offline_data import DatasetError, GaussianKnobs, LoggedDataset, collect, load_dataset, to_mdp_dataset


@dataclass
class Args:
    preset: str = "small"
    """World preset for training and evaluation."""
    timesteps: int = 150_000
    """PPO environment steps (user-requests)."""
    num_envs: int = 64
    """Simulated users stepped together during training."""
    users: int = 256
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
    dataset_users: int = 128
    """Users logged at once for the offline dataset."""
    dataset_steps: int = 400
    """Batched steps logged (finished users are replaced)."""
    behaviour_sigma: float = 0.3
    """Std of the truncated-normal knob noise of the logging policy around the weighted-sum baseline."""
    cql_steps: int = 2000
    """CQL gradient steps (0 skips CQL)."""
    cem: bool = True
    """Also tune a static knob vector by the cross-entropy method on the same simulation budget."""


def main(args: Args) -> list[dict]:
    if args.quick:
        args = replace(args, preset="tiny", timesteps=min(args.timesteps, 16_384), num_envs=32, users=64,
                       seeds=args.seeds[:1], dataset_users=32, dataset_steps=100, cql_steps=min(args.cql_steps, 500),
                       out=args.out.parent / (args.out.name + "_quick"))
    if args.timesteps < 1 or args.users < 2:
        raise ValueError(f"timesteps={args.timesteps} and users={args.users} must be >= 1 and >= 2")
    cfg = make_config(args.preset)
    sink = make_sink(args.wandb_mode or os.environ.get("WANDB_MODE", "") or "offline", project="feedgym",
                     config={"args": {k: str(v) for k, v in vars(args).items()}, "env": cfg.to_dict()},
                     group=f"main-{args.preset}", job_type="main", out_dir=args.out)
    t0 = time.perf_counter()
    policies: list = []
    if args.cql_steps > 0:
        print(f"[0/3] logging {args.dataset_users} users x {args.dataset_steps} steps with a randomized weighted-sum"
              f" policy, then CQL for {args.cql_steps} steps")
        ds = _dataset(args, cfg)
        algo = train_cql(to_mdp_dataset(ds), cfg, args.cql_steps, args.out / "cql", seed=args.train_seed,
                         params=CQLParams(), sink=sink, resume=args.resume, progress=True)
        policies.append(D3RLPolicy(algo, discrete=False, name="cql"))
    print(f"[1/3] training PPO on {args.preset} for {args.timesteps} steps ({args.num_envs} users at once)")
    model = train_ppo(cfg, args.timesteps, args.out / "ppo", seed=args.train_seed, num_envs=args.num_envs,
                      params=PPOParams(), sink=sink, resume=args.resume, progress=True)
    t1 = time.perf_counter()
    print(f"      trained in {t1 - t0:.0f}s")
    policies = [SB3Policy(model, "ppo"), *policies,
                *(make_baseline(b, seed=1000 + i) for i, b in enumerate(args.baselines))]
    if args.cem:
        print(f"[2/3] tuning a static knob vector by CEM on the same budget ({args.timesteps} steps)")
        cem = cem_tune(cfg, args.timesteps, seed=args.train_seed, progress=True)
        for h in cem.history:
            sink.log({f"train/cem_{k}": v for k, v in h.items()}, step=int(h["iter"]))
        policies.insert(len(policies) - len(args.baselines), ConstantKnobs(cem.best_action, "cem_tuned"))
        print(f"      CEM action: {[round(float(x), 2) for x in cem.best_action]}")
    t1 = time.perf_counter()
    print(f"[3/3] evaluating on {args.users} users x seeds {args.seeds}")
    comp = evaluate(policies, cfg, args.users, args.seeds)
    rows = summarize(comp)
    title = (f"feedgym main job: PPO, CEM ({args.timesteps} steps each), CQL ({args.cql_steps} steps) vs baselines"
             f" — {args.preset}, "
             f"{args.users} users x {len(args.seeds)} seeds")
    print_table(rows, title)
    sink.log({f"eval/{r['metric'].replace('/', '.')}/{r['policy']}": r["mean"] for r in rows},
             step=int(model.num_timesteps))
    cols = ["metric", "policy", "mean", "lo", "hi", "diff", "diff_lo", "diff_hi", "significant"]
    sink.log_table("eval/table", cols, [[r.get(c) for c in cols] for r in rows])
    sink.log_artifact(args.out / "ppo", f"ppo-{args.preset}", "model")
    if args.cql_steps > 0:
        sink.log_artifact(args.out / "cql", f"cql-{args.preset}", "model")
        sink.log_artifact(args.out / "dataset", f"dataset-{args.preset}", "dataset")
    sink.finish()
    cmd = "python scripts/main.py" + (" --quick" if args.quick else "")
    report = write_report(comp, rows, args.out, title, cmd)
    print(f"report and plots: {report.parent}  (train+CEM {t1 - t0:.0f}s, eval {time.perf_counter() - t1:.0f}s)")
    return rows


def _dataset(args: Args, cfg: FeedConfig) -> LoggedDataset:
    """The logged dataset: reused when it loads cleanly and matches the config, else collected again."""
    path = args.out / "dataset"
    if path.exists():
        try:
            return load_dataset(path, expected_config=cfg)
        except DatasetError as err:
            print(f"      dataset at {path} not reusable ({err}); collecting again")
    return collect(GaussianKnobs(args.behaviour_sigma), cfg, n_users=args.dataset_users, n_steps=args.dataset_steps,
                   seed=args.train_seed + 1, out=path, overwrite=True, progress=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(tyro.cli(Args))
