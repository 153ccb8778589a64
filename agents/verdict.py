"""Does an agent beat a baseline? The question of the project, decided the same way everywhere.

An agent *beats* a baseline when its paired 95 % interval of the 30-day retention difference lies
above zero, while it does not buy that with regret or with new creators' reach beyond a stated
tolerance (the upper end of the regret-rate difference at most ``regret_tol``, the lower end of the
new-creator impression-share difference at least ``-reach_tol``).

The intervals are the world-level ones (``world_lo`` / ``world_hi`` of
:func:`agents.stats.summarize`: evaluation seeds resampled, then users within each): the
question is about a preset's worlds, and one world's users share its trajectory. Evaluations with
few seeds therefore rarely conclude; that is the honest answer (README, "How many worlds").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agents.stats import Comparison, summarize

RETENTION = "retention/retained_30d"
REGRET = "engagement/regret_rate"
REACH = "creators/new_creator_share"


@dataclass(frozen=True)
class Tolerance:
    regret_tol: float = 0.002
    """Largest accepted rise of the regret rate (absolute: 0.2 percentage points of views)."""
    reach_tol: float = 0.01
    """Largest accepted fall of new creators' impression share (absolute: 1 percentage point)."""

    def __post_init__(self) -> None:
        # NaN would make every comparison False (nothing could beat, CEM's guardrail ranking NaN). inf = no limit;
        # a negative tolerance asks for an improvement of at least that much
        for name in ("regret_tol", "reach_tol"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"Tolerance.{name}={v!r} ({flag}) is invalid: must be a number (inf = no limit)")


def verdicts(rows: Sequence[dict[str, Any]], agents: Sequence[str], baseline: str,
             tol: Tolerance = Tolerance()) -> list[dict[str, Any]]:
    """One verdict per agent from :func:`agents.stats.summarize` rows computed against ``baseline``."""
    by = {(r["metric"], r["policy"]): r for r in rows}
    out = []
    for a in agents:
        ret, reg, rea = by.get((RETENTION, a)), by.get((REGRET, a)), by.get((REACH, a))
        if ret is None or "diff" not in ret or reg is None or rea is None:
            raise KeyError(f"no paired rows for agent {a!r} against {baseline!r} (metrics {RETENTION}, {REGRET}, "
                           f"{REACH}); was summarize() run with that baseline?")
        better = ret["world_lo"] > 0
        regret_ok = reg["world_hi"] <= tol.regret_tol
        reach_ok = rea["world_lo"] >= -tol.reach_tol
        out.append({"agent": a, "baseline": baseline, "retention_diff": ret["diff"], "retention_lo": ret["world_lo"],
                    "retention_hi": ret["world_hi"], "regret_diff": reg["diff"], "regret_diff_lo": reg["world_lo"],
                    "regret_diff_hi": reg["world_hi"], "reach_diff": rea["diff"], "reach_diff_lo": rea["world_lo"],
                    "reach_diff_hi": rea["world_hi"],
                    "retention_users_lo": ret["diff_lo"], "retention_users_hi": ret["diff_hi"],
                    "retention_better": better, "regret_ok": regret_ok, "reach_ok": reach_ok,
                    "beats": bool(better and regret_ok and reach_ok)})
    return out


def verdict_lines(vs: Sequence[dict[str, Any]], tol: Tolerance = Tolerance()) -> list[str]:
    """Human-readable verdicts (one line each)."""
    lines = []
    for v in vs:
        why = [] if v["retention_better"] else [
            "retention is lower (interval below 0)" if v["retention_hi"] < 0 else "retention interval includes 0"]
        why += [] if v["regret_ok"] else [f"regret may rise by up to {100 * v['regret_diff_hi']:.2f} pp "
                                          f"(tolerance {100 * tol.regret_tol:.1f})"]
        why += [] if v["reach_ok"] else [f"new-creator share may fall by up to {-100 * v['reach_diff_lo']:.2f} pp "
                                         f"(tolerance {100 * tol.reach_tol:.1f})"]
        users = ""
        if "retention_users_lo" in v:
            users = f" (users only: [{100 * v['retention_users_lo']:+.1f}, {100 * v['retention_users_hi']:+.1f}])"
        lines.append(f"{v['agent']} vs {v['baseline']}: 30-day retention {100 * v['retention_diff']:+.1f} pp "
                     f"[{100 * v['retention_lo']:+.1f}, {100 * v['retention_hi']:+.1f}]{users} -> "
                     f"{'BEATS' if v['beats'] else 'does not beat'}" + (f" ({'; '.join(why)})" if why else ""))
    return lines


def judge(comp: Comparison, rows: Sequence[dict[str, Any]], agents: Sequence[str], tol: Tolerance = Tolerance(),
          suffix: str = "", against: Sequence[str] = ("cem_tuned",), reps: int = 2000) -> list[dict[str, Any]]:
    """Verdicts of ``agents`` against ``comp``'s baseline (``rows`` = ``summarize(comp)``) and against each
    policy of ``against`` that ran (by default the CEM-tuned static baseline; ``reps`` bootstrap resamples);
    ``suffix`` is appended to the baseline names (e.g. the world)."""
    vs = verdicts(rows, agents, comp.baseline, tol)
    for other in dict.fromkeys(against):
        if other in comp.policies:
            other_rows = summarize(Comparison(runs=comp.runs, baseline=other), metrics=[RETENTION, REGRET, REACH],
                                   reps=reps)
            vs += verdicts(other_rows, agents, other, tol)
    return [{**v, "baseline": v["baseline"] + suffix} for v in vs]


def why_not(v: dict[str, Any]) -> str:
    """Why a verdict is not *beats*, in a few words ("" when it beats): ``n.s.`` (the retention interval includes 0),
    ``lower`` (it is below 0), ``regret +0.31 pp`` / ``new creators -1.4 pp`` (the interval's far end beyond the
    tolerance)."""
    if v["beats"]:
        return ""
    why = [] if v["retention_better"] else ["lower" if v["retention_hi"] < 0 else "n.s."]
    why += [] if v["regret_ok"] else [f"regret +{100 * v['regret_diff_hi']:.2f} pp"]
    why += [] if v["reach_ok"] else [f"new creators {100 * v['reach_diff_lo']:+.1f} pp"]
    return ", ".join(why)


def _cell(per_seed: Sequence[tuple[int, dict[str, Any]]], pooled: dict[str, Any]) -> dict[str, Any]:
    """One baseline's column of a headline row: every training seed's retention difference and verdict, how many
    seeds beat, and the pooled (or only) verdict's difference, interval and verdict."""
    return {"per_seed": [{"seed": s, "diff": v["retention_diff"], "lo": v["retention_lo"], "hi": v["retention_hi"],
                          "beats": v["beats"], "worse": v["retention_hi"] < 0} for s, v in per_seed],
            "passed": sum(v["beats"] for _, v in per_seed), "n": len(per_seed),
            "diff": pooled["retention_diff"], "lo": pooled["retention_lo"], "hi": pooled["retention_hi"],
            "beats": pooled["beats"], "worse": pooled["retention_hi"] < 0, "why": why_not(pooled)}


def headline(by_seed: Mapping[int, Sequence[dict[str, Any]]], agents: Sequence[str],
             pooled: Sequence[dict[str, Any]] | None = None, baseline: str = "weighted_sum",
             other: str = "cem_tuned") -> list[dict[str, Any]]:
    """The rows of the short table the main job leads with: one per agent of ``agents`` (then ``other``, judged
    against ``baseline`` alone), from the verdicts of every training seed (``by_seed``: seed -> :func:`verdicts`
    of that seed's agents against ``baseline`` and ``other``, and of ``other`` against ``baseline``) and, with
    several seeds, those of the seed-pooled comparison (``pooled``). Each row: ``agent``, ``seeds``, ``vs_baseline``
    and ``vs_other`` (None where not judged): the per-seed differences (``per_seed``: seed, diff, lo, hi, beats,
    worse), ``passed`` of ``n`` seeds beat, and the pooled (with one seed: that seed's) ``diff``, ``lo``, ``hi``,
    ``beats``, ``worse`` and ``why`` (not); ``regret`` and ``reach``: the pooled differences from ``baseline``
    (``diff``, ``lo``, ``hi``, world-level). Differences are absolute (0.01 = 1 pp)."""
    seeds = list(by_seed)
    if not seeds:
        raise ValueError("headline needs the verdicts of at least one training seed")
    if len(seeds) > 1 and pooled is None:
        raise ValueError(f"headline: {len(seeds)} training seeds need the pooled verdicts")
    final = list(pooled) if pooled is not None else list(by_seed[seeds[0]])

    def find(vs: Sequence[dict[str, Any]], agent: str, base: str) -> dict[str, Any] | None:
        return next((v for v in vs if v["agent"] == agent and v["baseline"] == base), None)

    rows = []
    for a in [*agents, other]:
        row: dict[str, Any] = {"agent": a, "seeds": seeds}
        for key, base in (("vs_baseline", baseline), ("vs_other", other)):
            per = [(s, find(by_seed[s], a, base)) for s in seeds]
            top = find(final, a, base)
            if top is None or any(v is None for _, v in per):
                row[key] = None
                continue
            row[key] = _cell([(s, v) for s, v in per if v is not None], top)
        top = find(final, a, baseline)
        if top is None:  # the agent was not judged (e.g. CEM-tuned when CEM did not run)
            continue
        row["regret"] = {"diff": top["regret_diff"], "lo": top["regret_diff_lo"], "hi": top["regret_diff_hi"]}
        row["reach"] = {"diff": top["reach_diff"], "lo": top["reach_diff_lo"], "hi": top["reach_diff_hi"]}
        rows.append(row)
    return rows
