"""How much can a state-dependent policy gain over the best constant knob vector? Measured before any RL.

Three non-RL instruments, all on the same keyed users and noise (``agents.planner.branched_rollout``):

- **CEM-tuned**: the best constant vector (``agents.cem.cem_tune``);
- **segment-CEM**: one vector per observed segment, tuned by the same CEM on the same budget
  (``cem_tune(segments=...)``, ``agents.segments``);
- **the clairvoyant planner**: branches every user into the arms of :func:`planner_arms` every ``period``
  requests and commits to the branch with the best hidden survival (an upper bound in practice, which also
  foresees the noise of the period);
- **the planner without foresight** (``agents.planner.blind_planner_rollout``): the same choice made on clones
  that live the period with random numbers of their own, so it knows the hidden state but not the noise;
- **the distilled planner** (``agents.distill``): the planner's choices fitted as a policy of the observation;
- **the constant arms and the hidden-trait terciles** (:func:`trait_terciles`): each planner arm served to every
  user, then, per tercile of a hidden trait, the best arm's gain over CEM-tuned beside the same for random
  (placebo) terciles: a trait that decides which setting is best gains more than the placebos do.

Headroom = planner minus CEM-tuned, and segment-CEM minus CEM-tuned, in 30-day retention, with world-level
paired 95 % intervals (``agents.stats.hierarchical_ci``: worlds resampled, then users within each).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from agents.planner import COUNTS, Decisions, KeyedResult
from agents.policies import ConstantKnobs
from agents.stats import hierarchical_ci
from envs.config import ENV_VERSION
from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.fileio import atomic_write_with
from rankers.types import Array

if TYPE_CHECKING:
    from envs.simulator import FeedSimulator

#: The planner's arms besides CEM-tuned's vector: named moves away from it (knob -> change of the action).
DEVIATIONS: dict[str, dict[str, float]] = {
    "diverse": {"diversity_strength": 0.8, "explore_share": 0.4},
    "focused": {"diversity_strength": -0.8, "explore_share": -0.4},
    "engaging": {"weight.watch_time": 0.8, "weight.p_complete": 0.5, "break_prompt": -0.8},
    "satisfying": {"weight.p_regret": 0.8, "weight.p_like": 0.4, "weight.p_share": 0.4},
    "break_now": {"break_prompt": 1.0},
}


def planner_arms(base: Array, table: Array | None = None,
                 deviations: dict[str, dict[str, float]] | None = None) -> list[ConstantKnobs]:
    """CEM-tuned's vector ``base`` (A,), then ``base`` moved by each of ``deviations`` (clipped), then the
    distinct rows of segment-CEM's ``table`` (S, A) if given."""
    base = np.clip(np.asarray(base, np.float32), -1, 1)
    arms = [ConstantKnobs(base, "cem_tuned")]
    for name, moves in (DEVIATIONS if deviations is None else deviations).items():
        a = base.copy()
        for knob, d in moves.items():
            a[KNOB_NAMES.index(knob)] += d
        arms.append(ConstantKnobs(np.clip(a, -1, 1), name))
    if table is not None:
        for i, row in enumerate(np.unique(np.asarray(table, np.float32).reshape(-1, N_KNOBS), axis=0)):
            arms.append(ConstantKnobs(row, f"segment_{i}"))
    return arms


def _rate_diff(a: Sequence[KeyedResult], b: Sequence[KeyedResult], masks: Sequence[Array], num: str) -> float:
    """Pooled rate ``num / videos`` over the masked users of ``a`` minus that of ``b``."""
    def rate(runs: Sequence[KeyedResult]) -> float:
        n = sum(r.counts[num][m].sum() for r, m in zip(runs, masks, strict=True))
        v = sum(r.counts["engagement/videos"][m].sum() for r, m in zip(runs, masks, strict=True))
        return float(n / max(v, 1.0))
    return rate(a) - rate(b)


def headroom_rows(results: dict[str, Sequence[KeyedResult]], reference: str = "cem_tuned",
                  groups: dict[str, Sequence[Array]] | None = None, reps: int = 2000) -> list[dict[str, Any]]:
    """One row per policy (and per group of users, e.g. new vs established): 30-day retention, its paired
    difference from ``reference`` with the world-level interval, regret-rate and new-creator-share differences.
    ``results[name][w]`` is world ``w``'s rollout; ``groups[label][w]`` a (U,) bool mask of world ``w``'s users."""
    if reference not in results:
        raise KeyError(f"no rollouts of the reference {reference!r}; have {sorted(results)}")
    ref = results[reference]
    masks: dict[str, Sequence[Array]] = {"all": [np.ones(r.retained.size, bool) for r in ref]}
    masks.update(groups or {})
    rows = []
    for label, mk in masks.items():
        for name, runs in results.items():
            if len(runs) != len(ref) or any(r.seed != q.seed or r.retained.size != q.retained.size
                                            for r, q in zip(runs, ref, strict=True)):
                raise ValueError(f"{name!r} and {reference!r} were not run on the same worlds and users")
            diffs = [r.retained[m].astype(np.float64) - q.retained[m] for r, q, m in zip(runs, ref, mk, strict=True)]
            ret = np.concatenate([r.retained[m] for r, m in zip(runs, mk, strict=True)]).mean()
            d, lo, hi = hierarchical_ci(diffs, reps=reps) if name != reference else (0.0, 0.0, 0.0)
            rows.append({"group": label, "policy": name, "users": int(sum(m.sum() for m in mk)),
                         "retention": float(ret), "diff": d, "lo": lo, "hi": hi,
                         "regret_diff": _rate_diff(runs, ref, mk, "engagement/regrets"),
                         "reach_diff": _rate_diff(runs, ref, mk, "creators/new_creator_impressions"),
                         "requests": int(sum(r.requests for r in runs))})
    return rows


#: Hidden per-user traits :func:`hidden_traits` reads (``envs.users.Users`` attributes at the start of a life).
HIDDEN_TRAITS: tuple[str, ...] = ("social_value", "social", "compliance", "appetite", "habit", "suscept", "rate_mult",
                                  "cold")


def hidden_traits(sim: FeedSimulator) -> dict[str, Array]:
    """(B,) float64 hidden traits of a freshly reset simulator's users."""
    return {t: np.asarray(getattr(sim.users, t), np.float64).copy() for t in HIDDEN_TRAITS}


def trait_terciles(retained: dict[str, Array], traits: dict[str, Array], reference: str = "cem_tuned",
                   placebos: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """Per trait: cut the users into terciles of the trait (fewer groups for a trait with point masses: a flag
    gives two), take in each the arm with the best retention gain over
    ``reference`` and sum the gains weighted by the terciles' sizes. ``retained`` maps arm -> (U,) 0/1 outcomes of
    the same users; ``traits`` name -> (U,) values. ``placebos`` random traits give the gain that picking the best
    of the arms in three random groups finds from noise and from the best constant alone."""
    ref = np.asarray(retained[reference], np.float64)
    n = ref.size
    rng = np.random.default_rng(seed)
    named = dict(traits) | {f"placebo_{i}": rng.random(n) for i in range(placebos)}
    rows = []
    for name, x in named.items():
        x = np.asarray(x, np.float64)
        if x.shape != (n,):
            raise ValueError(f"trait {name!r} has shape {x.shape}; the outcomes have {n} users")
        # values at a cut go to the lower group, so a trait with a point mass (a flag) still splits in two
        seg = np.searchsorted(np.unique(np.quantile(x, [1 / 3, 2 / 3])), x, side="left")
        gain, best = 0.0, []
        for s in np.unique(seg):
            m = seg == s
            d = {k: float(np.mean(np.asarray(v, np.float64)[m]) - ref[m].mean()) for k, v in retained.items()}
            b = max(d, key=lambda k: d[k])
            gain += m.mean() * d[b]
            best.append((b, d[b]))
        rows.append({"trait": name, "gain": float(gain), "best": best})
    return rows


def format_terciles(rows: Sequence[dict[str, Any]]) -> str:
    """The table of :func:`trait_terciles`: per trait the size-weighted gain of the best arm per tercile, then each
    tercile's best arm and its gain."""
    head = f"{'hidden trait':<14} {'gain of best arm per tercile, pp':>33}   terciles (low to high): best arm, pp"
    lines = [head, "-" * len(head)]
    for r in rows:
        parts = " | ".join(f"{b} {100 * g:+.1f}" for b, g in r["best"])
        lines.append(f"{r['trait']:<14} {100 * r['gain']:>+33.1f}   {parts}")
    return "\n".join(lines)


def format_rows(rows: Sequence[dict[str, Any]], reference: str = "cem_tuned") -> str:
    """The table a person reads: one line per (group, policy)."""
    head = (f"{'users':<12} {'policy':<14} {'n':>5} {'30-day ret.':>11} {'vs ' + reference + ' (pp) [95% world]':>34}"
            f" {'regret pp':>9} {'reach pp':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ci = f"{100 * r['diff']:+6.1f} [{100 * r['lo']:+5.1f}, {100 * r['hi']:+5.1f}]"
        if r["policy"] == reference:
            ci = "reference"
        lines.append(f"{r['group']:<12} {r['policy']:<14} {r['users']:>5} {r['retention']:>11.3f} {ci:>34}"
                     f" {100 * r['regret_diff']:>+9.2f} {100 * r['reach_diff']:>+8.2f}")
    return "\n".join(lines)


def rollout_path(store: Path, name: str, key: dict[str, Any]) -> Path:
    """Where the keyed rollout ``name`` with ``key`` (everything its outcome depends on) is stored."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(store) / f"{name}-{digest}.npz"


def save_rollout(path: Path, result: KeyedResult, key: dict[str, Any]) -> None:
    """Writes ``result`` and its ``key`` atomically (``np.savez``; the key as JSON beside the arrays)."""
    arrays = {"retained": result.retained, "start_obs": result.start_obs, "arm_share": result.arm_share,
              **{f"count:{c}": result.counts[c] for c in COUNTS}}
    if result.decisions is not None:
        arrays.update({"decisions:obs": result.decisions.obs, "decisions:scores": result.decisions.scores})
    meta = {"key": key, "name": result.name, "seed": result.seed, "requests": result.requests}
    buf = io.BytesIO()
    arrays["meta"] = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), np.uint8)
    np.savez(buf, **cast(dict[str, Any], arrays))
    atomic_write_with(path, lambda f: f.write(buf.getvalue()))


def load_rollout(path: Path, key: dict[str, Any]) -> KeyedResult | None:
    """The stored rollout at ``path`` if it was made under ``key``; None if there is none. A file that is
    there but unreadable, or made under another key, raises (it is never silently replaced)."""
    if not Path(path).exists():
        return None
    try:
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            data = {k: z[k] for k in z.files if k != "meta"}
        counts = {c: data[f"count:{c}"] for c in COUNTS}
        dec = Decisions(data["decisions:obs"], data["decisions:scores"]) if "decisions:obs" in data else None
        result = KeyedResult(meta["name"], int(meta["seed"]), data["retained"], counts, data["start_obs"],
                             data["arm_share"], int(meta["requests"]), dec)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"stored rollout {path} is unreadable ({err}); delete it to run it again") from err
    if meta["key"] != json.loads(json.dumps(key, sort_keys=True)):
        raise ValueError(f"stored rollout {path} was made under another key than its name says; delete it")
    return result


#: The instruments whose headroom over CEM-tuned the main job's verdicts name (``MainArgs.headroom``), in that order.
MEASURED: dict[str, str] = {"planner": "clairvoyant planner", "blind_planner": "planner without foresight",
                            "distilled": "distilled planner", "segment_cem": "segment-CEM"}


def read_headroom(path: Path, preset: str) -> dict[str, dict[str, Any]]:
    """The headroom over CEM-tuned (all users: ``diff``, ``lo``, ``hi``) each instrument of :data:`MEASURED` had in
    the ``headroom.json`` at ``path``; ``ValueError`` naming the problem for a file that is not one, or one measured
    on another env version or preset."""
    try:
        report = json.loads(Path(path).read_text())
        rows, version, where = report["rows"], report["env_version"], report["args"]["preset"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a headroom.json written by scripts/headroom.py ({err!r})") from None
    if version != ENV_VERSION:
        raise ValueError(f"{path} was measured on env {version!r}; this code is {ENV_VERSION!r}")
    if where != preset:
        raise ValueError(f"{path} was measured on preset {where!r}, this job runs {preset!r}")
    found = {r["policy"]: r for r in rows if r.get("group") == "all" and r.get("policy") in MEASURED}
    if "planner" not in found:
        raise ValueError(f"{path} has no planner row: run scripts/headroom.py with the planner")
    return {k: found[k] for k in MEASURED if k in found}


def headroom_line(measured: dict[str, dict[str, Any]], heads: Sequence[dict[str, Any]]) -> str:
    """One line for the verdicts: the measured headroom over CEM-tuned, and each agent's gain over CEM-tuned
    (``heads``: :func:`agents.verdict.headline` rows) as a share of the clairvoyant planner's."""
    def pp(r: dict[str, Any]) -> str:
        return f"{100 * r['diff']:+.1f} pp [{100 * r['lo']:+.1f}, {100 * r['hi']:+.1f}]"

    known = ", ".join(f"{MEASURED[k]} {pp(r)}" for k, r in measured.items())
    room = measured["planner"]["diff"]
    shares = [f"{h['agent']} {100 * h['vs_other']['diff'] / room:+.0f} %" for h in heads
              if h.get("vs_other") and room > 0]
    tail = f"; each agent's gain over cem_tuned as a share of the planner's: {', '.join(shares)}" if shares else ""
    return f"headroom over cem_tuned (scripts/headroom.py, its own users and worlds): {known}{tail}"

