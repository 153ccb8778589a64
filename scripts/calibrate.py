"""Calibration probe: the weighted-sum baseline's session, engagement and return figures on a world with changed
parameters, beside the calibration targets of docs/simulator.md.

A probe serves the preset's own trained rankers to the changed world (they are not re-trained on its logs), so a
probe costs one rollout, not a ranker training: it is for finding parameters quickly. The world's claims are then
checked by ``scripts/validate_world.py`` on the world with those parameters as defaults, with its own rankers.

    python scripts/calibrate.py --preset tiny --users 64
    python scripts/calibrate.py --preset small --set users.watch_bias=-0.1 "corpus.format_duration_s=[4,8,15,30]"
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

from agents.policies import BASELINES, make_baseline
from agents.rollouts import rollout
from agents.threads import one_thread_default
from envs.config import make_config
from envs.learned import provide_models
from offline_data.executor import exit_on_sigterm
from offline_data.provision import learned_models
from rankers.fileio import atomic_write

#: The probe's figures, with the calibration targets of docs/simulator.md ("Calibration targets").
TARGETS: dict[str, str] = {
    "engagement/session_minutes": "~30",
    "engagement/session_videos": "~100",
    "engagement/watch_s_per_video": "10-20",
    "engagement/complete_rate": "0.25-0.45",
    "engagement/skip_rate": "0.20-0.35",
    "engagement/like_rate": "0.05-0.10",
    "engagement/regret_rate": "a few %",
    "retention/sessions_per_day": "1-2",
    "retention/retained_30d": "0.40-0.80",
    "retention/day1_return": "",
    "engagement/first_session_watch_minutes": "",
}


@dataclass
class Args:
    preset: str = "small"
    """World preset whose parameters are changed (and whose trained rankers serve the probe)."""
    set: tuple[str, ...] = ()
    """Parameter changes, ``PATH=VALUE`` each (dotted path, JSON value): ``users.watch_bias=-0.1``."""
    users: int = 200
    """Users, one episode each."""
    seed: int = 0
    """World and user seed."""
    policy: str = "weighted_sum"
    """The baseline probed (agents.policies.BASELINES)."""
    out: Path | None = None
    """If set, the figures are written there as JSON."""


def main(args: Args) -> dict[str, float]:
    if args.users < 1:
        raise ValueError(f"--users {args.users} is invalid: give at least 1")
    if args.policy not in BASELINES:
        raise ValueError(f"--policy {args.policy!r} is invalid: choose one of {', '.join(sorted(BASELINES))}")
    base = make_config(args.preset)
    cfg = base.with_settings(args.set)
    provide_models(cfg, learned_models(base, progress=False))  # the preset's rankers serve the changed world
    t0 = time.perf_counter()
    run = rollout(make_baseline(args.policy), cfg, args.users, seed=args.seed)
    figures = {k: float(np.nanmean(run.per_user[k])) for k in TARGETS}
    print(f"calibration probe: {args.policy} on {args.preset} {' '.join(args.set) or '(defaults)'}, "
          f"{args.users} users, seed {args.seed}, {time.perf_counter() - t0:.0f} s")
    for k, v in figures.items():
        print(f"  {k:<42} {v:>9.4f}   {TARGETS[k]}")
    if args.out is not None:
        record = {"preset": args.preset, "set": list(args.set), "users": args.users, "seed": args.seed,
                  "policy": args.policy, "figures": figures}
        atomic_write(args.out, json.dumps(record, indent=1).encode())
    return figures


if __name__ == "__main__":
    exit_on_sigterm()
    one_thread_default()
    main(tyro.cli(Args))
