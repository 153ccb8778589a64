"""Headroom for state-dependent policies, measured before any agent is trained.

Tunes the best constant knob vector (CEM-tuned) and one vector per observed segment (segment-CEM) by the
same CEM on the same budget (segment-CEM branches from the constant search's mean after ``--segment-from``
of the budget and spends the rest per segment), runs the clairvoyant planner (and, with ``--policies ...
blind_planner``, the planner without foresight of the noise: ``agents.planner.blind_planner_rollout``) and,
with ``--policies ... distilled``, the planner distilled into a policy of the observation
(``agents/distill.py``: fitted on the planner's recorded choices in ``--distill-worlds`` training worlds), and
prints one table: 30-day retention of each, its paired difference from CEM-tuned with a world-level 95 %
interval (``--seeds`` worlds x ``--users`` users, the same keyed users and noise for every policy), regret and
new-creator-share differences, for all users and for new / established users. See agents/headroom.py and
docs/simulator.md ("State-dependence").

    python scripts/headroom.py --preset tiny --users 256 --seeds 0 1 2 3
    python scripts/headroom.py --preset small --users 256 --seeds 0 1 2 3     # the issue's setting (slow)
    python scripts/headroom.py --preset small --tuned runs/headroom/cem.json --policies distilled  # vectors reused
    python scripts/headroom.py --preset small --executor ray --workers 4      # the searches' worlds side by side

With ``--executor ray`` each CEM iteration runs its ``--train-worlds`` worlds as parallel jobs (``agents.cem``,
``offline_data.executor``); the tuned vectors are the same bytes as in-process, so the executor is not part of
their key. The rollouts and the planner run in this process.

The tuned vectors are kept in ``<out>/cem.json`` under a key of the config, budget, seed, segments and a
digest of the code, so a rerun (or a run interrupted after tuning) reuses them; each (policy, world) rollout
is kept in ``<out>/rollouts/`` under a key of everything it depends on, so an interrupted run resumes, and
runs over disjoint ``--seeds`` (e.g. one per core) fill one store that a last run over all seeds reads.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from agents.cem import cem_tune
from agents.distill import DistilledPlanner, distill_planner
from agents.evaluation import check_seeds
from agents.headroom import (
    format_rows,
    format_terciles,
    headroom_rows,
    hidden_traits,
    load_rollout,
    planner_arms,
    rollout_path,
    save_rollout,
    trait_terciles,
)
from agents.planner import KeyedResult, blind_planner_rollout, branched_rollout
from agents.policies import ConstantKnobs
from agents.segments import FIELDS, Segmenter, SegmentKnobs
from agents.threads import one_thread_default
from agents.verdict import Tolerance
from envs.config import ENV_VERSION, PRESETS, make_config
from envs.observation import ObservationLayout
from envs.simulator import FeedSimulator
from offline_data.executor import Executor, exit_on_sigterm, make_executor
from offline_data.provision import code_digest, ensure_rankers_all
from rankers.fileio import atomic_write

DISTILL_SEED = 1000
"""The distilled planner's first training world (evaluation worlds are ``--seeds``, searches use their own)."""
POLICIES: tuple[str, ...] = ("weighted_sum", "segment_cem", "planner", "blind_planner", "distilled", "constant_arms")

KEY_PACKAGES: tuple[str, ...] = ("rankers", "envs", "offline_data", "agents")
"""The code a tuned vector or a rollout depends on (its digest is part of their keys)."""


@dataclass
class Args:
    preset: str = "tiny"
    """World preset; CEM, segment-CEM and the planner all run on it."""
    users: int = 256
    """Users per evaluation world (the same keyed users for every policy)."""
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    """Evaluation worlds (one simulator each); intervals resample them, then users within each."""
    cem_budget: int = 1_000_000
    """User-requests each search spends (CEM-tuned and segment-CEM alike)."""
    train_seed: int = 12345
    """Seed of the searches (their worlds differ from the evaluation worlds)."""
    train_worlds: int = 4
    """Worlds the searches spread their users over."""
    splits: tuple[str, ...] = ("tenure_days=7",)
    """Segment-CEM's splits, ``field=threshold`` in native units (fields: tenure_days, visits_per_day,
    topic_entropy, session_minutes, hours_since_last_visit, like_rate, share_rate, break_take_rate); 2^n
    segments. The default splits new users (first week) from established ones (the seeds' cold-start concern);
    every split doubles the searches a budget feeds."""
    segment_from: float = 0.5
    """Share of the budget the constant search spends before segment-CEM branches from its mean; segment-CEM
    then spends the rest, so both searches spend ``--cem-budget`` (0: segment-CEM from the zero action)."""
    refine_std: float = 0.25
    """Segment-CEM's initial spread when it branches from the constant search (``0.5`` from zero)."""
    period: int = 10
    """Requests between the planner's commitments (about two a session; more often makes the bound tighter)."""
    planner_segment_arms: bool = True
    """Give the planner (and the distilled planner) segment-CEM's distinct vectors as arms too
    (``--no-planner-segment-arms``: the six others only, 2-3x cheaper on ``small``)."""
    policies: tuple[str, ...] = ("weighted_sum", "segment_cem", "planner")
    """The policies compared with CEM-tuned (the reference, always run): any of weighted_sum, segment_cem,
    planner, blind_planner (the planner knowing the hidden state but not the noise to come), distilled (the
    planner distilled into a policy of the observation, ``agents/distill.py``), constant_arms (each of the
    planner's arms other than CEM-tuned served to every user as a constant vector, rows ``const_<arm>``: the
    control that tells a decision by state from a better constant the constant search missed)."""
    blind_samples: int = 2
    """With ``blind_planner``: look-ahead clones per arm, each with noise of its own; the planner takes the arm
    with the best mean."""
    distill_worlds: int = 2
    """With ``distilled``: training worlds (seeds 1000, 1001, ...; none is an evaluation world) on which the
    planner's commitments are recorded, ``--users`` users each; the last one chooses the fit's penalty."""
    tuned: Path | None = None
    """Take CEM-tuned's and segment-CEM's vectors from this ``cem.json`` (an earlier run's, whatever code made
    it; its key is kept in headroom.json) instead of searching."""
    out: Path = Path("runs/headroom")
    """Where headroom.json and cem.json go."""
    progress: bool = True
    executor: Literal["local", "ray"] = "local"
    """Where the searches' worlds run: in this process, or on Ray (offline_data.executor); results do not depend on
    it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine; one world of a search per CPU, one torch thread
    each)."""


def parse_splits(splits: tuple[str, ...]) -> Segmenter:
    out = []
    for s in splits:
        name, sep, thr = s.partition("=")
        if not sep or name not in FIELDS:
            raise ValueError(f"--splits {s!r} is invalid: need field=threshold with field in {sorted(FIELDS)}")
        try:
            out.append((name, float(thr)))
        except ValueError:
            raise ValueError(f"--splits {s!r}: threshold {thr!r} is not a number") from None
    return Segmenter(tuple(out))


def _tuned(args: Args, seg: Segmenter) -> dict[str, Any]:
    """CEM-tuned's vector and segment-CEM's table, from ``<out>/cem.json`` when its key matches."""
    cfg = make_config(args.preset, reward={"mode": "churn_expected"})
    key = {"env_version": ENV_VERSION, "config": cfg.to_json(), "budget": args.cem_budget, "seed": args.train_seed,
           "worlds": args.train_worlds, "splits": seg.to_json(), "segment_from": args.segment_from,
           "refine_std": args.refine_std, "code": code_digest(packages=KEY_PACKAGES)}
    if args.tuned is not None:
        try:
            given = json.loads(Path(args.tuned).read_text())
            vectors = {k: given[k] for k in ("key", "cem_tuned", "segment_cem")}
        except (OSError, ValueError, KeyError) as err:
            raise ValueError(f"--tuned {args.tuned}: not a cem.json written by this script ({err})") from None
        theirs = vectors["key"] if isinstance(vectors["key"], dict) else {}
        for field, want in (("env_version", ENV_VERSION), ("config", cfg.to_json()), ("splits", seg.to_json())):
            if theirs.get(field) != want:
                raise ValueError(f"--tuned {args.tuned}: its vectors were tuned with another {field} than this run's "
                                 "(world, env version or --splits): they would serve the wrong users")
        print(f"taking the tuned vectors from {args.tuned} (budget {vectors['key'].get('budget')}, "
              f"env {vectors['key'].get('env_version')})")
        return {**vectors, "source": str(args.tuned)}
    path = args.out / "cem.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                print(f"reusing the tuned vectors in {path}")
                return stored
        except (OSError, ValueError) as err:
            print(f"{path} unreadable ({err}); tuning again")
    t0 = time.perf_counter()
    # Ray is started only when there is something to tune
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        const, segm = _search(args, cfg, seg, ex)
    out = {"key": key, "cem_tuned": const.best_action.tolist(), "segment_cem": segm.best_action.tolist(),
           "seconds": time.perf_counter() - t0}
    atomic_write(path, json.dumps(out, indent=1).encode())
    return out


def _search(args: Args, cfg: Any, seg: Segmenter, ex: Executor) -> tuple[Any, Any]:
    """The constant search and segment-CEM (from the constant search's mean after ``--segment-from``)."""
    common = dict(seed=args.train_seed, progress=args.progress, worlds=args.train_worlds, constraints=Tolerance(),
                  executor=ex)
    const = cem_tune(cfg, args.cem_budget, **common)
    start = int(args.segment_from * args.cem_budget)
    if start:
        segm = cem_tune(cfg, args.cem_budget - start, segments=seg, init_mean=const.mean_after(start),
                        init_std=args.refine_std, **common)
    else:
        segm = cem_tune(cfg, args.cem_budget, segments=seg, **common)
    return const, segm


def _distilled(args: Args, cfg: Any, arms: list[ConstantKnobs], digest: str) -> DistilledPlanner:
    """The planner over ``arms`` recorded on ``--distill-worlds`` training worlds (kept in the rollout store) and
    distilled into a policy of the observation."""
    def key(seed: int) -> dict[str, Any]:
        return {"env_version": ENV_VERSION, "config": cfg.to_json(), "users": args.users, "seed": seed,
                "period": args.period, "arms": [p.fingerprint() for p in arms], "code": digest, "record": True}

    def path(seed: int) -> Path:
        return rollout_path(args.out / "rollouts", f"planner-record-w{seed}", key(seed))

    return distill_planner(arms, cfg, args.users, [DISTILL_SEED + i for i in range(args.distill_worlds)],
                           args.period, progress=args.progress, recorded=lambda s: load_rollout(path(s), key(s)),
                           keep=lambda s, res: save_rollout(path(s), res, key(s)))


def main(args: Args) -> dict[str, Any]:
    if args.preset not in PRESETS:
        raise ValueError(f"--preset {args.preset!r} unknown: choose from {PRESETS}")
    if args.users < 2 or args.cem_budget < 1 or args.period < 1 or args.blind_samples < 1:
        raise ValueError(f"--users >= 2, --cem-budget >= 1, --period >= 1 and --blind-samples >= 1 needed; got "
                         f"{args.users}, {args.cem_budget}, {args.period}, {args.blind_samples}")
    if not 0 <= args.segment_from < 1 or not args.refine_std > 0:
        raise ValueError(f"--segment-from must be in [0, 1) and --refine-std > 0; got {args.segment_from}, "
                         f"{args.refine_std}")
    if args.executor == "local" and args.ray_address:
        raise ValueError(f"--ray-address {args.ray_address} needs --executor ray")
    if args.workers < 0:
        raise ValueError(f"--workers={args.workers} is invalid: must be >= 0 (0 = every core)")
    if bad := [p for p in args.policies if p not in POLICIES]:
        raise ValueError(f"--policies {bad} unknown: choose from {POLICIES} (cem_tuned, the reference, always runs)")
    distill_seeds = range(DISTILL_SEED, DISTILL_SEED + args.distill_worlds)
    if "distilled" in args.policies and (args.distill_worlds < 2 or set(args.seeds) & set(distill_seeds)):
        raise ValueError(f"--distill-worlds={args.distill_worlds}: the distilled planner needs >= 2 training worlds "
                         f"(one chooses the penalty), and --seeds must not include its worlds ({DISTILL_SEED}...)")
    check_seeds(args.seeds)
    one_thread_default()
    seg = parse_splits(args.splits)
    cfg = make_config(args.preset)
    ensure_rankers_all([cfg], progress=args.progress)  # the learned rankers the preset serves (built once, cached)
    tuned = _tuned(args, seg)
    cem_vec = np.asarray(tuned["cem_tuned"], np.float32)
    table = np.asarray(tuned["segment_cem"], np.float32)
    arms: dict[str, list[Any]] = {"weighted_sum": [ConstantKnobs(np.zeros_like(cem_vec), "weighted_sum")],
                                  "cem_tuned": [ConstantKnobs(cem_vec, "cem_tuned")],
                                  "segment_cem": [SegmentKnobs(table, seg)]}
    planner_set = list(planner_arms(cem_vec, table if args.planner_segment_arms else None))
    arms = {k: v for k, v in arms.items() if k == "cem_tuned" or k in args.policies}
    if "planner" in args.policies:
        arms["planner"] = planner_set
    if "blind_planner" in args.policies:
        arms["blind_planner"] = planner_set
    if "constant_arms" in args.policies:
        arms.update({f"const_{a.name}": [a] for a in planner_set if a.name != "cem_tuned"})
    digest = code_digest(packages=KEY_PACKAGES)
    if "distilled" in args.policies:
        arms["distilled"] = [_distilled(args, cfg, planner_set, digest)]
    t0 = time.perf_counter()
    results: dict[str, list[KeyedResult]] = {}
    for name, pols in arms.items():
        results[name] = []
        for s in args.seeds:
            key = {"env_version": ENV_VERSION, "config": cfg.to_json(), "users": args.users, "seed": s,
                   "period": args.period if len(pols) > 1 else None, "arms": [p.fingerprint() for p in pols],
                   "code": digest, **({"samples": args.blind_samples} if name == "blind_planner" else {})}
            path = rollout_path(args.out / "rollouts", f"{name}-w{s}", key)
            res = load_rollout(path, key)
            if res is None:
                if name == "blind_planner":
                    res = blind_planner_rollout(pols, cfg, args.users, s, args.period, args.blind_samples,
                                                name=f"{name} world {s}", progress=args.progress)
                else:
                    res = branched_rollout(pols, cfg, args.users, s, args.period, name=f"{name} world {s}",
                                           progress=args.progress)
                save_rollout(path, res, key)
            results[name].append(res)
        print(f"  {name}: {time.perf_counter() - t0:.0f} s")
    lay = ObservationLayout(cfg)
    established = [Segmenter((("tenure_days", 7.0),)).assign(r.start_obs, lay) == 1 for r in results["cem_tuned"]]
    groups = {"new": [~e for e in established], "established": established}
    rows = headroom_rows(results, "cem_tuned", groups)
    print(format_rows(rows))
    if "distilled" in args.policies:
        dist = arms["distilled"][0]
        share = np.mean([dist.choices(r.start_obs) for r in results["cem_tuned"]], axis=0)
        print(f"distilled planner (held-out R^2 of the arms' advantages {dist.model.held_out_r2:.4f}, penalty "
              f"{dist.model.penalty:g}), its choices at the users' first request: "
              + ", ".join(f"{a.name} {100 * x:.0f} %" for a, x in zip(planner_set, share, strict=True)))
    for who in ("planner", "blind_planner"):
        if who in args.policies:
            share = np.mean([r.arm_share for r in results[who]], axis=0)
            names = [a.name for a in arms[who]]
            print(f"{who}'s choices: " + ", ".join(f"{n} {100 * s:.0f} %" for n, s in zip(names, share, strict=True)))
    terciles = None
    if "constant_arms" in args.policies:  # which hidden traits decide the best constant arm
        consts = [k for k in results if k == "cem_tuned" or k.startswith("const_")]
        traits: dict[str, list[np.ndarray]] = {}
        for s in args.seeds:
            sim = FeedSimulator(cfg, args.users, seed=s)
            sim.key_users(np.arange(args.users))  # the keyed users of the one-arm rollouts, in identity order
            sim.reset()
            for t, v in hidden_traits(sim).items():
                traits.setdefault(t, []).append(v)
        terciles = trait_terciles({k: np.concatenate([r.retained for r in results[k]]).astype(np.float64)
                                   for k in consts}, {t: np.concatenate(v) for t, v in traits.items()})
        print(format_terciles(terciles))
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "env_version": ENV_VERSION, "rows": rows,
              "terciles": terciles,
              "tuned_key": tuned["key"],
              "segments": seg.labels(), "cem_tuned": tuned["cem_tuned"], "segment_cem": tuned["segment_cem"],
              "seconds": time.perf_counter() - t0}
    atomic_write(args.out / "headroom.json", json.dumps(report, indent=1).encode())
    return report


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started
    main(tyro.cli(Args))
