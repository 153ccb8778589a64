"""Validate the hidden world: does it show what the seeds argue from?

Runs the weighted-sum baseline and a set of contrast policies on the same users and the same noise
(common random numbers: one simulator per (policy, seed) built from that seed, one episode per
user, no autoreset: ``agents.evaluation.evaluate`` with constant-knob policies) and prints, with
95 % bootstrap intervals over users (paired differences against the baseline), whether each claim
holds:

  (a) pure-engagement ranking gains watch time early but ends with lower 30-day retention and
      more regret than the weighted-sum baseline;
  (b) with exploration and new-creator slots off, new creators' impression share and follows collapse;
  (c) in-session adaptation lifts per-session engagement (the seed claims 10-15 %);
  (d) without the diversity rules, topic entropy narrows;
  (e) the knobs matter: some constant knob preset moves 30-day retention by more than the interval;
  (f) the best vector depends on the user: some constant knob preset's effect on 30-day retention differs
      between new users (first week after signup) and established users (the interaction's interval
      excludes 0), so the two groups' best vectors differ;
  (g) headroom: on ``small``, the clairvoyant planner beats CEM-tuned by >= 5 pp and segment-CEM by >= 2 pp
      of 30-day retention, both world-level intervals above 0 (read from ``scripts/headroom.py``'s
      ``headroom.json``, ``--headroom``; not run here: it tunes two searches and branches every user);
  (h) bots: with engagement rings and no detector, boosted videos take a measurable share of what the
      trending source serves and regret rises; the detector removes at least half of that share;
  (i) regions: in a world of ``--regions`` regions and ``--languages`` languages whose users all just signed
      up, the local trending source and the regional prior raise day-1 return against global-only trending.

Metric definitions: envs/metrics.py. Mechanisms and the last table: docs/simulator.md.

    python scripts/validate_world.py --preset small --users 1000 --seeds 0
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import tyro

from agents.evaluation import check_reps, check_seeds, evaluate
from agents.policies import ConstantKnobs
from agents.rollouts import METRICS
from agents.threads import one_thread_default
from envs.config import make_config
from envs.metrics import DEFINITIONS
from offline_data.executor import exit_on_sigterm, make_executor
from offline_data.provision import ensure_rankers_all
from rankers.config import KNOB_NAMES, N_KNOBS
from rankers.fileio import atomic_write
from rankers.knobs import KNOB_MENU
from rankers.types import Array


@dataclass
class Args:
    preset: str = "small"
    """World preset (tiny, small, default, large); the output states it."""
    users: int = 1000
    """Users per seed, one episode each, the same users for every policy."""
    seeds: tuple[int, ...] = (0,)
    """Seeds; each builds one world and one user population shared by all policies."""
    knob_presets: tuple[str, ...] = ("exploit_only", "watch_time", "satisfaction", "diverse", "wellbeing")
    """Constant knob presets (rankers/knobs.py KNOB_MENU) tried for claim (e); any of them may pass."""
    early_metric: str = "engagement/first_session_watch_minutes"
    """The 'watch time early' metric of claim (a): the first session's watch minutes, before any return
    decision. Day 0's total (``engagement/first_day_watch_minutes``) also counts how many sessions day 0
    holds, a Poisson draw that depends on satisfaction; it is printed beside it."""
    bootstrap_reps: int = 2000
    """Bootstrap resamples per interval."""
    out: Path | None = None
    """If set, write results.json there."""
    progress: bool = True
    """Show progress bars."""
    executor: Literal["local", "ray"] = "local"
    """Where the rollouts run: in this process, or on Ray (offline_data.executor); results do not depend on it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine; one rollout per CPU, one torch thread each)."""
    bot_rings: float = 20.0
    """Engagement rings a day in the worlds of claim (h)."""
    regions: int = 6
    """Regions of the world of claim (i)."""
    languages: int = 4
    """Languages of the world of claim (i)."""
    claims: tuple[str, ...] = ("a", "b", "c", "d", "e", "f", "g", "h", "i")
    """The claims to check (each runs only the policies it needs; the weighted-sum baseline always runs)."""
    store: Path | None = None
    """A rollout store directory: rollouts found there are read, new ones written as each ends, so an interrupted
    run resumes where it stopped (each rollout is keyed by everything it depends on, code included)."""
    headroom: Path | None = None
    """``headroom.json`` written by ``scripts/headroom.py`` for claim (g) (None: (g) is reported as not run)."""


def _action(**knobs: float) -> Array:
    a = np.zeros(N_KNOBS, np.float32)
    for k, v in knobs.items():
        a[KNOB_NAMES.index(k)] = v
    return a


#: The policies each claim compares with the weighted-sum baseline (``knobs:*``: every ``--knob-presets`` entry).
CLAIM_POLICIES: dict[str, tuple[str, ...]] = {
    "a": ("engagement",), "b": ("no_explore",), "c": ("no_adaptation",), "d": ("no_diversity_rules",),
    "e": ("knobs:*",), "f": ("knobs:*",), "g": (), "h": ("bots", "bots_detector"),
    "i": ("regional_local", "regional_global"),
}


def policies(args: Args) -> dict[str, tuple[dict[str, Any], Array]]:
    """Name -> (config overrides, constant action (A,)), the baseline and what ``args.claims`` need."""
    every = _all_policies(args)
    want = {"weighted_sum"} | {p for c in args.claims for p in CLAIM_POLICIES[c]}
    return {k: v for k, v in every.items() if k in want or (k.startswith("knobs:") and "knobs:*" in want)}


def _all_policies(args: Args) -> dict[str, tuple[dict[str, Any], Array]]:
    out: dict[str, tuple[dict[str, Any], Array]] = {
        "weighted_sum": ({}, _action()),
        "engagement": ({"pipeline": {"score_mode": "engagement", "rebalancing": False}}, _action()),
        "no_explore": ({}, _action(explore_share=-1.0, new_creator_share=-1.0)),
        "no_adaptation": ({}, _action(adaptation_strength=-1.0)),
        "no_diversity_rules": ({"pipeline": {"diversity_rules": False}}, _action()),
    }
    for name in args.knob_presets:
        out[f"knobs:{name}"] = ({}, np.asarray(KNOB_MENU[name], np.float32))
    bots = {"corpus": {"bot_rings_per_day": args.bot_rings}}
    out["bots"] = (bots, _action())
    out["bots_detector"] = ({**bots, "pipeline": {"bot_filter": True}}, _action())
    regional = {"corpus": {"n_regions": args.regions, "n_languages": args.languages},
                "users": {"cold_start_share": 1.0}}
    out["regional_local"] = (regional, _action())
    out["regional_global"] = ({**regional, "pipeline": {"local_trending": False, "regional_prior": False}}, _action())
    return out


def _diff_note(r: dict[str, float], label: str) -> str:
    return f"{label} {r['diff']:+.2f} [{r['diff_lo']:+.2f}, {r['diff_hi']:+.2f}], reported, not tested"


def bootstrap(x: Array, reps: int, rng: np.random.Generator) -> tuple[float, float, float]:
    """Mean of ``x`` (n,) and its 95 % percentile-bootstrap interval over users."""
    x = np.asarray(x, np.float64)
    n = x.size
    means = np.empty(reps)
    for i in range(0, reps, 250):  # chunks keep memory at 250 x n
        k = min(250, reps - i)
        means[i : i + k] = x[rng.integers(0, n, (k, n))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(x.mean()), float(lo), float(hi)


def new_users(args: Args) -> Array:
    """(users x seeds,) bool: the evaluated users who signed up within the week before the episode, in
    ``evaluate``'s order (each seed's simulator draws its first users the same way for every policy)."""
    from envs.simulator import FeedSimulator

    out = []
    for seed in args.seeds:
        sim = FeedSimulator(make_config(args.preset), args.users, seed=seed)
        sim.reset()
        out.append(sim.users.tenure < 7.0)
    return np.concatenate(out)


def interaction(d: Array, group: Array, reps: int, rng: np.random.Generator) -> dict[str, float]:
    """Mean of ``d`` over ``group`` (its effect there) and the difference of its means over ``group`` and the
    rest, with a 95 % bootstrap interval (users resampled within each group)."""
    a, b = np.asarray(d[group], np.float64), np.asarray(d[~group], np.float64)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"claim (f) needs >= 2 new and >= 2 established users; got {a.size} and {b.size}")
    boots = np.empty(reps)
    for i in range(0, reps, 250):
        k = min(250, reps - i)
        boots[i:i + k] = (a[rng.integers(0, a.size, (k, a.size))].mean(1)
                          - b[rng.integers(0, b.size, (k, b.size))].mean(1))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(a.mean()), "lo": float("nan"), "hi": float("nan"), "diff": float(a.mean() - b.mean()),
            "diff_lo": float(lo), "diff_hi": float(hi)}


def headroom_claim(path: Path | None) -> dict[str, Any]:
    """Claim (g) from ``scripts/headroom.py``'s ``headroom.json`` (not run without one)."""
    text = "headroom on small: planner - CEM-tuned >= 5 pp and segment-CEM - CEM-tuned >= 2 pp, intervals above 0"
    if path is None:
        return {"claim": "g", "text": text, "policy": "planner, segment_cem", "pass": False, "rows": [],
                "note": "not run: pass --headroom runs/headroom/headroom.json (scripts/headroom.py --preset small)"}
    rep = json.loads(Path(path).read_text())
    rows, ok = [], rep.get("args", {}).get("preset") == "small"
    for policy, target in (("planner", 0.05), ("segment_cem", 0.02)):
        r = next((x for x in rep["rows"] if x["group"] == "all" and x["policy"] == policy), None)
        if r is None:
            ok = False
            continue
        passed = r["lo"] > 0 and r["diff"] >= target
        ok &= passed
        rows.append({"metric": "retention/retained_30d vs cem_tuned", "policy": policy, "mean": r["retention"],
                     "lo": float("nan"), "hi": float("nan"), "diff": r["diff"], "diff_lo": r["lo"],
                     "diff_hi": r["hi"], "pass": passed})
    return {"claim": "g", "text": text, "policy": "planner, segment_cem", "pass": bool(ok and len(rows) == 2),
            "rows": rows, "note": f"from {path} (preset {rep.get('args', {}).get('preset')})"}


def main(args: Args) -> dict[str, Any]:
    if args.users < 2:
        raise ValueError(f"--users={args.users} is invalid: need at least 2 users for intervals")
    check_seeds(args.seeds)
    check_reps(args.bootstrap_reps)
    if bad := [k for k in args.knob_presets if k not in KNOB_MENU]:
        raise ValueError(f"--knob-presets {bad} unknown: choose from {sorted(KNOB_MENU)}")
    if bad := [c for c in args.claims if c not in CLAIM_POLICIES]:
        raise ValueError(f"--claims {bad} unknown: choose from {sorted(CLAIM_POLICIES)}")
    if args.early_metric not in METRICS:
        raise ValueError(f"--early-metric {args.early_metric!r} is not a per-user metric: choose from {METRICS}")
    pols = policies(args)
    runners = []
    for name, (overrides, action) in pols.items():
        pol = ConstantKnobs(action, name)
        pol.env_overrides = overrides  # this policy's pipeline (e.g. pure engagement, no diversity rules)
        runners.append(pol)
    t0 = time.perf_counter()
    base_cfg = make_config(args.preset)
    # the learned rankers of every world the policies run in (built once each, cached)
    ensure_rankers_all([base_cfg.replace(**ov) if ov else base_cfg for ov, _ in pols.values()], progress=args.progress)
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        comp = evaluate(runners, make_config(args.preset), args.users, args.seeds, progress=args.progress,
                        executor=ex, store=args.store)
    keys = list(comp.runs[0].per_user)
    pu = {p: {k: comp.per_user(p, k) for k in keys} for p in pols}
    elapsed = time.perf_counter() - t0
    rng = np.random.default_rng(12345)
    reps = args.bootstrap_reps
    base = pu["weighted_sum"]

    def stat(policy: str, metric: str, ref: str = "weighted_sum") -> dict[str, float]:
        m, lo, hi = bootstrap(pu[policy][metric], reps, rng)
        row = {"mean": m, "lo": lo, "hi": hi}
        if policy != ref:
            d, dlo, dhi = bootstrap(pu[policy][metric] - pu[ref][metric], reps, rng)
            row.update(diff=d, diff_lo=dlo, diff_hi=dhi)
        return row

    up = lambda r: r["diff_lo"] > 0  # noqa: E731 - significantly above the baseline
    down = lambda r: r["diff_hi"] < 0  # noqa: E731 - significantly below the baseline
    claims: list[dict[str, Any]] = []

    def claim(key: str, text: str, policy: str, checks: list[tuple[str, Any]], extra: str = "",
              ref: str = "weighted_sum") -> None:
        rows = []
        ok = True
        for metric, test in checks:
            r = stat(policy, metric, ref)
            passed = bool(test(r))
            ok &= passed
            rows.append({"metric": metric, "policy": policy, **r, "pass": passed})
        claims.append({"claim": key, "text": text, "policy": policy, "pass": ok, "rows": rows, "note": extra})

    on = set(args.claims)
    if "a" in on:
        claim("a", "pure engagement: more watch time early, lower 30-day retention, more regret", "engagement",
              [(args.early_metric, up), ("retention/retained_30d", down), ("engagement/regret_rate", up)],
              _diff_note(stat("engagement", "engagement/first_day_watch_minutes"), "day-0 watch minutes"))
    if "b" in on:
        nc = stat("no_explore", "creators/new_creator_share")
        drop = 1.0 - nc["mean"] / max(stat("weighted_sum", "creators/new_creator_share")["mean"], 1e-12)
        claim("b", "exploration and new-creator slots off: new creators' impressions and follows collapse",
              "no_explore", [("creators/new_creator_share", lambda r: down(r) and drop >= 0.5),
                             ("creators/new_creator_follows", down)],
              f"impression share falls by {100 * drop:.0f} % (collapse = at least 50 %)")
    if "c" in on:  # (c) is a lift of the baseline over the adaptation-off policy: the sign flips.
        ad = stat("no_adaptation", "engagement/session_minutes")
        lift = base["engagement/session_minutes"].mean() / max(ad["mean"], 1e-12) - 1.0
        claim("c", "in-session adaptation lifts per-session engagement (seed: 10-15 %)", "no_adaptation",
              [("engagement/session_minutes", down)],
              f"lift with adaptation = {100 * lift:+.1f} % (seed: +10-15 %, "
              f"{'in' if 0.10 <= lift <= 0.15 else 'outside'} that range)")
    if "d" in on:
        claim("d", "diversity rules off: topic entropy narrows", "no_diversity_rules", [("slate/topic_entropy", down)])
    if "e" in on:
        knob_rows = []
        for name in args.knob_presets:
            r = stat(f"knobs:{name}", "retention/retained_30d")
            knob_rows.append({"metric": "retention/retained_30d", "policy": f"knobs:{name}", **r,
                              "pass": bool(up(r) or down(r))})
        claims.append({"claim": "e", "text": "the knobs matter: a constant knob preset moves 30-day retention",
                       "policy": "knobs:*", "pass": any(r["pass"] for r in knob_rows), "rows": knob_rows, "note": ""})
    if "f" in on:
        new = new_users(args)
        inter_rows = []
        for name in args.knob_presets if min(new.sum(), (~new).sum()) >= 2 else ():
            d = pu[f"knobs:{name}"]["retention/retained_30d"] - base["retention/retained_30d"]
            r = interaction(d, new, reps, rng)
            inter_rows.append({"metric": "retention/retained_30d (new - established)", "policy": f"knobs:{name}",
                               **r, "pass": bool(up(r) or down(r))})
        claims.append({"claim": "f", "text": "the best vector depends on the user: a preset's retention effect "
                       "differs between new and established users", "policy": "knobs:*",
                       "pass": any(r["pass"] for r in inter_rows), "rows": inter_rows,
                       "note": f"{int(new.sum())} new and {int((~new).sum())} established users; mean = effect on "
                               "new users, diff = new minus established" + ("" if inter_rows else " (too few)")})
    if "g" in on:
        claims.append(headroom_claim(args.headroom))
    if "h" in on:
        boosted = stat("bots", "integrity/boosted_trending_share")["mean"]
        kept = stat("bots_detector", "integrity/boosted_trending_share")["mean"]
        cut = 1.0 - kept / max(boosted, 1e-12)
        claim("h", "bots, no detector: boosted videos take a share of trending impressions and regret rises", "bots",
              [("integrity/boosted_trending_share", up), ("engagement/regret_rate", up)],
              f"{args.bot_rings:g} rings a day; the detector leaves {100 * kept:.1f} % of trending impressions "
              f"boosted against {100 * boosted:.1f} % without it: {100 * cut:.0f} % removed (claim: >= 50 %)")
        claims[-1]["pass"] = bool(claims[-1]["pass"] and cut >= 0.5)
    if "i" in on:
        claim("i", "regions: local trending and the regional prior raise new users' day-1 return", "regional_local",
              [("retention/day1_return", up)], f"{args.regions} regions, {args.languages} languages, every user "
              "new; against global-only trending and the population prior", ref="regional_global")

    overview_metrics = ["retention/retained_30d", "retention/day1_return", "retention/day7_return",
                        "retention/sessions_per_day", "engagement/session_minutes", "engagement/session_videos",
                        "engagement/watch_s_per_video", "engagement/first_day_watch_minutes",
                        "engagement/first_session_watch_minutes", "engagement/like_rate", "engagement/share_rate",
                        "engagement/comment_rate", "engagement/follow_rate", "engagement/skip_rate",
                        "engagement/complete_rate", "engagement/regret_rate", "creators/new_creator_share",
                        "slate/topic_entropy"]
    baseline = {m: stat("weighted_sum", m) for m in overview_metrics}
    n_total = args.users * len(args.seeds)
    header = (f"feedgym world validation: preset={args.preset}, {args.users} users x seeds {list(args.seeds)} "
              f"= {n_total} users per policy, common random numbers, 95 % bootstrap CIs ({reps} reps), "
              f"{elapsed:.0f} s")
    lines = [header, "", "weighted-sum baseline (zero action, default config):"]
    for m, r in baseline.items():
        lines.append(f"  {m:42s} {r['mean']:9.4f}  [{r['lo']:.4f}, {r['hi']:.4f}]")
    lines += ["", f"{'claim':5s} {'policy':26s} {'metric':42s} {'policy mean':>11s} {'diff vs baseline [95% CI]':>34s}"
              "  result"]
    for c in claims:
        for r in c["rows"]:
            ci = f"{r.get('diff', 0.0):+.4f} [{r.get('diff_lo', 0.0):+.4f}, {r.get('diff_hi', 0.0):+.4f}]"
            lines.append(f"({c['claim']})   {r['policy']:26s} {r['metric']:42s} {r['mean']:11.4f} {ci:>34s}  "
                         f"{'ok' if r['pass'] else 'no'}")
        note = f"  ({c['note']})" if c["note"] else ""
        lines.append(f"({c['claim']})   => {'PASS' if c['pass'] else 'FAIL'}: {c['text']}{note}")
    table = "\n".join(lines)
    print(table)
    result = {"preset": args.preset, "users": args.users, "seeds": list(args.seeds), "elapsed_s": elapsed,
              "baseline": baseline, "claims": claims, "table": table,
              "definitions": {k: v[0] for k, v in DEFINITIONS.items()},
              "means": {p: {k: float(v.mean()) for k, v in d.items()} for p, d in pu.items()}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "results.json", json.dumps(result, indent=1).encode())
    return result


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started (a private Ray too)
    one_thread_default()
    main(tyro.cli(Args))
