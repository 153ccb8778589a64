"""What CQL checkpoints learned, on 5,000 / 2,000 logged states of a main-job run: each knob's greedy action
against the CEM anchor the log was written around (mean and spread over states), and the critic around the
anchor (agents.cql.critic_landscape). Run from the repository root:

    python docs/results/cql-variants/inspect_cql.py runs/main runs/main/cql runs/cql-cw1/cql ...
"""
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import d3rlpy

from agents.cql import critic_landscape
from envs.config import make_config
from offline_data import load_dataset
from rankers.config import KNOB_NAMES

run = Path(sys.argv[1])
ds = load_dataset(run / "dataset", expected_config=make_config("small").replace(reward={"mode": "churn_expected"}))
t = ds.transitions
anchor = np.asarray(json.loads((run / "cem.json").read_text())["action"], np.float32)
rng = np.random.default_rng(0)
states = t.observations[rng.choice(len(t), 5000, replace=False)]
print(f"logged actions: mean - anchor within {np.abs(t.actions.mean(0) - anchor).max():.2f}, sd "
      f"{t.actions.std(0).min():.2f}-{t.actions.std(0).max():.2f}; reward per request {t.rewards.mean():.5f} "
      f"(sd {t.rewards.std():.5f})")
for path in sys.argv[2:]:
    algo = d3rlpy.load_learnable(str(Path(path) / "cql.d3"), device="cpu:0")
    act = np.clip(algo.predict(states), -1, 1)
    dev = act.mean(0) - anchor
    land = critic_landscape(algo, states[:2000], anchor)
    worst = KNOB_NAMES[int(np.abs(dev).argmax())]
    print(f"{path}: greedy action - anchor: largest |mean| {np.abs(dev).max():.2f} ({worst}), "
          f"spread over states {act.std(0).max():.2f} at most; Q(anchor) {land['q']:.3g} (sd over states "
          f"{land['q_sd']:.2g}); Q(anchor -/+ 0.3 on one knob) - Q(anchor): "
          f"down {land['down'].min():+.3f}..{land['down'].max():+.3f}, "
          f"up {land['up'].min():+.3f}..{land['up'].max():+.3f}")
