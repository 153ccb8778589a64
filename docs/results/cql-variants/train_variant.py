"""Trains CQL as main.py does (seed 12345, 2,000 steps) on a main-job run's logged dataset, with other
hyperparameters, into <out>/cql (a checkpoint compare.py --agents reads). Used for docs/point7.md, "Why CQL
serves its anchor"; run from the repository root:

    python docs/results/cql-variants/train_variant.py runs/main runs/cql-cw1 --conservative-weight 1
    python docs/results/cql-variants/train_variant.py runs/main runs/cql-g99-rs100-cw1 --gamma 0.99 \\
        --reward-scale 100 --conservative-weight 1
"""
import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from agents.cql import CQLParams, train_cql
from envs.config import make_config
from offline_data import load_dataset, to_mdp_dataset
from scripts.main import _dataset_id

p = argparse.ArgumentParser()
p.add_argument("run", type=Path)
p.add_argument("out", type=Path)
p.add_argument("--gamma", type=float, default=0.999)
p.add_argument("--conservative-weight", type=float, default=5.0)
p.add_argument("--reward-scale", type=float, default=1.0)
a = p.parse_args()
tcfg = make_config("small").replace(reward={"mode": "churn_expected"})
ds = load_dataset(a.run / "dataset", expected_config=tcfg)
params = replace(CQLParams(), gamma=a.gamma, conservative_weight=a.conservative_weight, reward_scale=a.reward_scale)
t = time.perf_counter()
train_cql(to_mdp_dataset(ds), tcfg, 2000, a.out / "cql", seed=12345, params=params, resume=False,
          dataset_id=_dataset_id(ds))
print(f"{params}: {time.perf_counter() - t:.0f}s")
