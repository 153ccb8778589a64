"""``scripts/main.py``'s command line (twenty flags, named configurations), the short table it leads with, and the
main job over several training seeds."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from agents.main_configs import (
    CONFIGS,
    FLAGS,
    MainArgs,
    check_args,
    command_line,
    named_config,
    parse_cli,
    quick_args,
)
from agents.main_job import pooled_comparison
from agents.report import headline_markdown, headline_table
from agents.rollouts import RunResult
from agents.stats import Comparison
from agents.verdict import REACH, REGRET, RETENTION, Tolerance, headline, verdicts
from tests.test_scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _help(capsys: pytest.CaptureFixture) -> str:
    with pytest.raises(SystemExit) as done:
        parse_cli(["--help"])
    assert done.value.code == 0
    got = capsys.readouterr()
    return got.out + got.err


def test_help_lists_at_most_twenty_flags_and_every_named_configuration(capsys: pytest.CaptureFixture):
    text = _help(capsys)
    flags = set(re.findall(r"^[│ ]*(--[a-z][a-z-]*)", text, re.M))  # the first flag of each option's line
    assert len(flags) <= 20 and "--help" not in flags, sorted(flags)
    assert flags == {"--" + f.replace("_", "-") for f in FLAGS} - {"--train-seeds"} | {"--train-seed"}
    assert "--train-seeds" in text  # the alias is listed beside it
    for name in CONFIGS:
        assert re.search(rf"^  {re.escape(name)} +\S", text, re.M), name
    for hidden in ("--num-envs", "--ppo.gamma", "--anchor", "--cem-paired", "--discrete", "--regret-tol"):
        assert hidden not in text, hidden


def _documented_commands() -> list[tuple[str, str]]:
    """Every ``python scripts/main.py ...`` command of README.md and the current docs (not the dated records of
    docs/point7.md and docs/results/, which quote the flags of their time)."""
    found = []
    for doc in ("README.md", "docs/guide.md", "docs/ray.md", "docs/experiments.md"):
        for line in (ROOT / doc).read_text().splitlines():
            for m in re.finditer(r"python scripts/main\.py((?: +--?[\w.-]+(?: +[^-`|#\s][^`|#\s]*)*)*)", line):
                found.append((doc, m.group(1)))
    return found


@pytest.mark.parametrize(("doc", "argv"), _documented_commands())
def test_every_documented_command_parses(doc: str, argv: str, capsys: pytest.CaptureFixture):
    if "--help" in argv.split():
        with pytest.raises(SystemExit) as done:
            parse_cli(shlex.split(argv))
        assert done.value.code == 0
        return
    check_args(parse_cli(shlex.split(argv)))


def test_the_default_and_quick_commands_keep_their_meaning():
    assert parse_cli([]) == MainArgs() == CONFIGS["main"].args
    quick = parse_cli(["--quick"])
    assert quick == dataclasses.replace(MainArgs(), quick=True)
    shrunk, changed = quick_args(quick)
    assert (shrunk.preset, shrunk.timesteps, shrunk.num_envs, shrunk.users, shrunk.seeds, shrunk.cem_budget,
            shrunk.cql_steps, shrunk.out) == ("tiny", 16_384, 32, 64, (0,), 131_072, 500, Path("runs/main_quick"))
    assert "preset tiny" in changed
    check_args(shrunk)
    # an explicit --out is kept; another configuration's quick look has its own directory
    assert quick_args(parse_cli(["--quick", "--out", "x"]))[0].out == Path("x")
    assert quick_args(parse_cli(["--quick", "--config", "discrete"]))[0].out == Path("runs/main-discrete_quick")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_named_configurations_are_valid_and_their_commands_reproduce_them(name: str):
    args = named_config(name)
    check_args(args)
    check_args(quick_args(args)[0])
    assert args.config == name and (args.out == Path("runs/main")) == (name == "main")
    assert parse_cli(["--config", name]) == args
    changed = dataclasses.replace(args, users=64, seeds=(4, 5), train_seeds=(1, 2), shift=False, quick=True,
                                  out=Path("runs/x y"))
    cmd = command_line(changed)
    assert cmd.startswith("python scripts/main.py") and "#" not in cmd
    assert ("--config" in cmd) == (name != "main")
    assert parse_cli(shlex.split(cmd)[2:]) == changed
    # a field no flag sets is said, not dropped
    assert command_line(dataclasses.replace(args, num_envs=8)).endswith("# and num_envs=8 (no flags)")


def test_named_configurations_change_what_they_say():
    main = CONFIGS["main"].args

    def diff(name: str) -> dict:
        other = CONFIGS[name].args
        return {f.name: getattr(other, f.name) for f in dataclasses.fields(MainArgs)
                if f.name not in ("config", "out") and getattr(other, f.name) != getattr(main, f.name)}

    assert diff("main") == {}
    assert diff("from-scratch") == {"anchor": "weighted_sum"}
    assert diff("discrete") == {"discrete": True}
    assert diff("cem-unguarded") == {"cem_guardrails": False}
    assert diff("cem-unpaired") == {"cem_guardrails": False, "cem_paired": False}
    assert diff("cem-guard-v1") == {"cem_guard_z": 0.0, "cem_paired": False}
    assert diff("two-budgets") == {"cem_budget": 500_000, "anchor_budget": 500_000}
    assert diff("cem-spi50") == {"cem_steps_per_iter": 50}
    assert [n for n, c in CONFIGS.items() if c.superseded] == ["cem-unpaired", "cem-guard-v1", "two-budgets",
                                                              "cem-spi50"]


def test_one_training_seed_is_the_single_seed_job():
    one = parse_cli(["--train-seed", "7"])
    assert (one.train_seed, one.train_seeds) == (7, ())
    assert parse_cli(["--train-seeds", "3", "1"]).train_seeds == (3, 1)
    assert command_line(one) == "python scripts/main.py --train-seed 7"


@pytest.mark.parametrize(("argv", "pattern"), [
    (["--users", "1"], r"users=1 is invalid \(--users\)"),
    (["--shift-users", "0"], r"shift_users=0 is invalid \(--shift-users\)"),
    (["--cem-budget", "-1"], r"cem_budget=-1 is invalid \(--cem-budget\)"),
    (["--cql-steps", "-1"], r"cql_steps=-1 is invalid \(--cql-steps\)"),
    (["--workers", "-2"], r"workers=-2 is invalid \(--workers\)"),
    (["--timesteps", "0"], r"timesteps=0 is invalid \(--timesteps\)"),
    (["--timesteps", "3000000"], r"cem_budget=2500000 is below the PPO budget \(--cem-budget < --timesteps"),
    (["--seeds", "0", "0"], r"--seeds 0 0 is invalid: it repeats a seed"),
    (["--train-seeds", "2", "2"], r"--train-seeds 2 2 is invalid: it repeats a seed"),
    (["--train-seeds", "-1"], r"--train-seeds \[-1\] is invalid"),
    (["--train-seeds"], r"--train-seeds is empty"),
    (["--baselines", "random", "random"], r"--baselines random random is invalid: it repeats an entry"),
    (["--baselines", "random"], r"--baselines random is invalid: weighted_sum"),
])
def test_bad_values_are_refused_naming_the_flag(argv: list[str], pattern: str):
    with pytest.raises(ValueError, match=pattern):
        parse_cli(argv)


@pytest.mark.parametrize(("change", "pattern"), [
    ({"num_envs": 0}, r"num_envs=0 is invalid \(num_envs: a field of the named configuration, no flag\)"),
    ({"cem_guard_z": float("nan")}, r"cem_guard_z=nan is invalid"),
    ({"regret_tol": float("nan")}, r"regret_tol=nan is invalid"),
    ({"behaviour_sigma": 0.0}, r"behaviour_sigma=0\.0 is invalid"),
    ({"train_worlds": 300}, r"train_worlds=300 is invalid.*num_envs=256"),
    ({"train_worlds": 3}, r"train_worlds=3 is invalid.*32 users"),
    ({"anchor": "cem", "cem": False}, r"anchor='cem' needs the CEM stage"),
    ({"config": "nope"}, r"--config 'nope' is invalid: choose one of main, from-scratch"),
])
def test_bad_configuration_fields_are_refused_naming_the_field(change: dict, pattern: str):
    with pytest.raises(ValueError, match=pattern):
        check_args(dataclasses.replace(MainArgs(), **change))


@pytest.mark.parametrize("argv", [["--config", "nope"], ["--num-envs", "8"], ["--anchor", "weighted_sum"],
                                  ["--discrete"], ["--ppo.gamma", "0.9"]])
def test_unknown_flags_and_configurations_are_refused(argv: list[str], capsys: pytest.CaptureFixture):
    with pytest.raises(SystemExit) as done:
        parse_cli(argv)
    assert done.value.code != 0


def _rows(agent: str, base: str, ret: float, spread: float = 0.02, regret_hi: float = 0.0, reach_lo: float = 0.0):
    """summarize-like rows of ``agent`` against ``base`` with a retention difference ``ret`` +- ``spread``."""
    return [{"metric": RETENTION, "policy": agent, "diff": ret, "diff_lo": ret - spread, "diff_hi": ret + spread,
             "world_lo": ret - spread, "world_hi": ret + spread},
            {"metric": REGRET, "policy": agent, "diff": regret_hi / 2, "world_lo": -0.001, "world_hi": regret_hi},
            {"metric": REACH, "policy": agent, "diff": reach_lo / 2, "world_lo": reach_lo, "world_hi": 0.01}]


def _judged(ppo_ws: float, ppo_cem: float, cem_ws: float) -> list[dict]:
    tol = Tolerance()
    return (verdicts(_rows("ppo", "weighted_sum", ppo_ws), ["ppo"], "weighted_sum", tol)
            + verdicts(_rows("ppo", "cem_tuned", ppo_cem), ["ppo"], "cem_tuned", tol)
            + verdicts(_rows("cem_tuned", "weighted_sum", cem_ws, regret_hi=0.005), ["cem_tuned"], "weighted_sum",
                       tol))


def test_headline_counts_the_seeds_that_beat_and_leads_with_the_pooled_verdict():
    by_seed = {0: _judged(0.08, 0.03, 0.05), 1: _judged(0.06, 0.0, 0.05), 2: _judged(0.01, -0.05, 0.05)}
    pooled = _judged(0.05, -0.006, 0.05)
    rows = headline(by_seed, ["ppo"], pooled)
    assert [r["agent"] for r in rows] == ["ppo", "cem_tuned"]
    ppo, cem = rows
    assert (ppo["vs_baseline"]["passed"], ppo["vs_other"]["passed"], ppo["vs_other"]["n"]) == (2, 1, 3)
    assert [p["worse"] for p in ppo["vs_other"]["per_seed"]] == [False, False, True]
    assert ppo["vs_baseline"]["beats"] and not ppo["vs_other"]["beats"]
    assert ppo["vs_other"]["why"] == "n.s."
    assert cem["vs_other"] is None and cem["regret"]["hi"] == 0.005
    assert cem["vs_baseline"]["why"] == "regret +0.50 pp" and cem["vs_baseline"]["passed"] == 0
    header, body = headline_table(rows)
    assert header[0] == "agent" and "per seed (0, 1, 2)" in header[1] and len(header) == 9
    assert body[0][1] == "+8.0✓ +6.0✓ +1.0 (2/3)" and body[0][2] == "+5.0 [+3.0, +7.0]"
    assert body[0][3] == "+3.0✓ +0.0 -5.0✗ (1/3)"
    assert body[0][-2:] == ["2/3 seeds; pooled BEATS", "1/3 seeds; pooled no (n.s.)"]
    assert body[1][3] == "—" and body[1][-2:] == ["0/3 seeds; pooled no (regret +0.50 pp)", "—"]
    md = headline_markdown(rows, "At a glance", Tolerance())
    assert md.startswith("## At a glance\n\n| agent |") and "(k/n) seeds that beat" in md
    with pytest.raises(ValueError, match="pooled verdicts"):
        headline(by_seed, ["ppo"])


def test_headline_of_one_seed_has_no_seed_columns():
    rows = headline({12345: _judged(-0.03, 0.01, 0.05)}, ["ppo"])
    header, body = headline_table(rows)
    assert len(header) == 7 and header[1] == "Δ 30-day retention vs weighted_sum"
    assert body[0][1:3] == ["-3.0 [-5.0, -1.0]", "+1.0 [-1.0, +3.0]"]
    assert body[0][-2:] == ["worse", "no (n.s.)"]
    assert body[1][-2:] == ["no (regret +0.50 pp)", "—"]
    assert "Per seed" not in headline_markdown(rows, "x", Tolerance())


def _run(policy: str, seed: int, retained: list[float]) -> RunResult:
    x = np.asarray(retained, np.float64)
    return RunResult(policy=policy, seed=seed, per_user={RETENTION: x, REGRET: 0 * x, REACH: 0 * x},
                     population={}, retention_by_day=np.ones(3), knob_means=np.zeros(2))


def test_pooled_comparison_averages_the_seeds_agents_user_by_user():
    a = Comparison(runs=[_run("ppo", 0, [1, 0, 1]), _run("weighted_sum", 0, [0, 0, 1]),
                         _run("ppo", 1, [1, 1, 1]), _run("weighted_sum", 1, [0, 1, 1])])
    b = Comparison(runs=[_run("ppo", 0, [0, 0, 1]), _run("weighted_sum", 0, [0, 0, 1]),
                         _run("ppo", 1, [1, 1, 0]), _run("weighted_sum", 1, [0, 1, 1])])
    pooled = pooled_comparison([a, b], [RETENTION, REGRET, REACH])
    np.testing.assert_array_equal(pooled.per_user("ppo", RETENTION), [0.5, 0, 1, 1, 1, 0.5])
    np.testing.assert_array_equal(pooled.per_user("weighted_sum", RETENTION), [0, 0, 1, 0, 1, 1])
    with pytest.raises(ValueError, match="other users"):
        pooled_comparison([a, Comparison(runs=[_run(r.policy, r.seed, [1, 1]) for r in a.runs])], [RETENTION])


def test_main_job_over_two_training_seeds(tmp_path: Path, capsys: pytest.CaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch):
    """Two training seeds: each trains in its own folder, the baseline runs once, every agent is judged per seed
    and pooled, the printed result leads with the short table; run again, everything is read back."""
    main = load_script("main")
    args = main.Args(preset="tiny", train_seeds=(0, 1), timesteps=512, cem_budget=51_200, num_envs=8, users=4,
                     seeds=(0,), out=tmp_path, baselines=("weighted_sum",), wandb_mode="disabled", dataset_users=8,
                     dataset_steps=10, cql_steps=10, shift=False, progress=False)
    rows = main.main(args)
    printed = capsys.readouterr().out
    agents = ("ppo", "cql")
    assert {r["policy"] for r in rows} == {f"{a}_s{s}" for a in (*agents, "cem_tuned") for s in (0, 1)} | {
        "weighted_sum"}
    for s in (0, 1):
        seed_dir = tmp_path / f"seed-{s}"
        assert json.loads((seed_dir / "cem.json").read_text())["seed"] == s
        assert (seed_dir / "ppo" / "checkpoint.zip").exists() and (seed_dir / "cql" / "cql.d3").exists()
        assert (seed_dir / "metrics.jsonl").stat().st_size > 0
    assert not (tmp_path / "ppo").exists() and not (tmp_path / "cem.json").exists()
    stored = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "rollouts").glob("*.npz"))
    assert stored == sorted([f"{p}-tiny-seed0" for p in ("weighted_sum", *(f"{a}_s{s}" for a in (*agents, "cem_tuned")
                                                                           for s in (0, 1)))])
    saved = json.loads((tmp_path / "verdicts.json").read_text())
    assert saved["train_seeds"] == [0, 1]
    assert sorted((v["agent"], v["baseline"], str(v["train_seed"])) for v in saved["verdicts"]) == sorted(
        (a, b, s) for a in agents for b in ("weighted_sum", "cem_tuned") for s in ("0", "1", "pooled"))
    head = saved["headline"]["tiny"]
    assert [h["agent"] for h in head] == [*agents, "cem_tuned"]
    assert all(h["vs_baseline"]["n"] == 2 for h in head) and head[-1]["vs_other"] is None
    # the pooled difference is the two seeds' average (same users, same baseline)
    for h in head:
        per = [p["diff"] for p in h["vs_baseline"]["per_seed"]]
        assert h["vs_baseline"]["diff"] == pytest.approx(np.mean(per), abs=1e-12)
    # the console leads with the short table (no full table there); report.md has both, the short one first
    assert "At a glance: tiny" in printed and re.search(r"\([012]/2\)", printed)
    assert "engagement/watch_minutes" not in printed
    assert printed.index("At a glance") < printed.index("full table, verdicts and plots")
    md = (tmp_path / "report.md").read_text()
    assert md.index("At a glance") < md.index("## All metrics") < md.index("engagement/watch_minutes")
    assert "[train seed 1]" in md and "--train-seeds 0 1" in md

    import agents.rollouts as ro

    def no_rollout(*a, **k):
        raise AssertionError("a stored rollout was run again")

    monkeypatch.setattr(ro, "rollout", no_rollout)
    cem_before = [(tmp_path / f"seed-{s}" / "cem.json").read_bytes() for s in (0, 1)]
    again = main.main(args)
    assert [(r["policy"], r["metric"], r["mean"], r.get("diff")) for r in again] == [
        (r["policy"], r["metric"], r["mean"], r.get("diff")) for r in rows]
    assert [(tmp_path / f"seed-{s}" / "cem.json").read_bytes() for s in (0, 1)] == cem_before
    assert json.loads((tmp_path / "verdicts.json").read_text())["verdicts"] == saved["verdicts"]
    monkeypatch.undo()

    # same seed, same bits: the job of training seed 1 alone (in-process, the driver's sink and executor) tunes,
    # logs and trains what seed 1's executor job did, and judges its agents the same
    single = main.main(dataclasses.replace(args, train_seeds=(), train_seed=1, out=tmp_path / "single"))
    assert (tmp_path / "single" / "cem.json").read_bytes() == (tmp_path / "seed-1" / "cem.json").read_bytes()

    def logged(where: Path) -> dict:  # the dataset's record (its files' sha256 included) but the git revision, which
        meta = json.loads((where / "dataset" / "meta.json").read_text())  # a commit made meanwhile would change
        return {k: v for k, v in meta.items() if k != "git"}

    assert logged(tmp_path / "single") == logged(tmp_path / "seed-1")
    from agents.loading import load_agent

    for agent in agents:
        assert load_agent(tmp_path / "single" / agent).fingerprint() == load_agent(
            tmp_path / "seed-1" / agent).fingerprint(), agent
    means = {(r["policy"], r["metric"]): r["mean"] for r in rows}
    for r in single:
        if not r["metric"].startswith("perf/"):  # wall-clock latencies differ
            name = r["policy"] if r["policy"] == "weighted_sum" else f"{r['policy']}_s1"
            assert r["mean"] == means[(name, r["metric"])], (name, r["metric"])
    alone = json.loads((tmp_path / "single" / "verdicts.json").read_text())["verdicts"]
    ours = [{k: v for k, v in x.items() if k != "train_seed"} for x in saved["verdicts"] if x["train_seed"] == 1]
    assert alone == ours
