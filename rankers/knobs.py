"""The one place where the agent's action in ``[-1, 1]^A`` becomes native knob values.

The zero action gives exactly the seed's configuration: head weights as ``RANKING_WEIGHTS``,
20 % exploration, 15 % new-creator slots, diversity strength 1, adaptation x1.3 / x0.5,
take-a-break prompt after 60 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rankers.config import HEADS, KNOB_NAMES, N_KNOBS, PipelineConfig
from rankers.types import Array


@dataclass(frozen=True)
class Knobs:
    """Native knob values for B users."""

    head_mult: Array  # (B, K) float32 multiplier on each seed head weight
    explore_share: Array  # (B,) float32 in [0, 1]
    new_creator_share: Array  # (B,) float32 in [0, 1]
    diversity_strength: Array  # (B,) float32 in [0, 2]
    adaptation_strength: Array  # (B,) float32 in [0, 2]
    break_after_min: Array  # (B,) float32 minutes

    def weights(self, cfg: PipelineConfig) -> Array:
        """(B, K) float32 effective head weights."""
        return (np.asarray(cfg.ranking_weights, np.float32)[None, :] * self.head_mult).astype(np.float32)


def validate_action(action: Array, n_users: int) -> Array:
    """Returns ``action`` as (B, A) float32 or raises ``ValueError`` naming what is wrong."""
    a = np.asarray(action)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):  # not bool, complex, str
        raise ValueError(f"action must be real numbers, got dtype {a.dtype}")
    if a.shape == (N_KNOBS,) and n_users == 1:
        a = a[None, :]
    if a.shape != (n_users, N_KNOBS):
        raise ValueError(f"action has shape {a.shape}, expected ({n_users}, {N_KNOBS}) = (users, knobs {KNOB_NAMES})")
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"action contains NaN or inf (first at user {bad[0]}, knob {KNOB_NAMES[bad[1]]!r})")
    return np.clip(a.astype(np.float32), -1.0, 1.0)


def knobs_from_action(action: Array, cfg: PipelineConfig) -> Knobs:
    """Maps a validated (B, A) action in [-1, 1] to native knobs."""
    k = cfg.knobs
    nh = len(HEADS)
    a = action
    return Knobs(
        head_mult=np.power(np.float32(k.head_weight_range), a[:, :nh]).astype(np.float32),
        explore_share=np.clip(cfg.explore_share + k.explore_delta * a[:, nh], 0.0, 1.0).astype(np.float32),
        new_creator_share=np.clip(cfg.new_creator_share + k.new_creator_delta * a[:, nh + 1], 0.0, 1.0).astype(
            np.float32
        ),
        diversity_strength=(1.0 + a[:, nh + 2]).astype(np.float32),
        adaptation_strength=(1.0 + a[:, nh + 3]).astype(np.float32),
        break_after_min=(cfg.break_after_min * np.power(np.float32(k.break_range), -a[:, nh + 4])).astype(np.float32),
    )


def knobs_to_dict(knobs: Knobs) -> dict[str, Array]:
    """Per-user native values keyed by knob name (for logging ``knobs/*``)."""
    out = {f"weight.{h}": knobs.head_mult[:, i] for i, h in enumerate(HEADS)}
    out.update(explore_share=knobs.explore_share, new_creator_share=knobs.new_creator_share,
               diversity_strength=knobs.diversity_strength, adaptation_strength=knobs.adaptation_strength,
               break_after_min=knobs.break_after_min)
    return out


assert len(HEADS) + 5 == N_KNOBS


def _menu_entry(**knobs: float) -> Array:
    v = np.zeros(N_KNOBS, np.float32)
    for name, val in knobs.items():
        v[KNOB_NAMES.index(name)] = val
    return v


#: The discrete env's menu: named knob settings (an action vector each). Index 0 is the seed.
KNOB_MENU: dict[str, Array] = {
    "seed_baseline": _menu_entry(),
    "explore_more": _menu_entry(explore_share=1.0),
    "exploit_only": _menu_entry(explore_share=-1.0),
    "creator_boost": _menu_entry(new_creator_share=1.0, **{"weight.p_follow": 1.0}),
    "diverse": _menu_entry(diversity_strength=1.0, explore_share=0.5),
    "satisfaction": _menu_entry(**{"weight.p_regret": 1.0, "weight.p_share": 0.5, "weight.p_like": 0.5}),
    "watch_time": _menu_entry(**{"weight.watch_time": 1.0, "weight.p_complete": 1.0, "weight.p_regret": -1.0}),
    "wellbeing": _menu_entry(break_prompt=1.0, **{"weight.p_regret": 1.0}),
}

