"""Every script's ``main`` runs in-process with a tiny budget and writes what it promises."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize(
    ("script", "kwargs", "pattern"),
    [
        ("compare", {"seeds": ()}, r"--seeds is empty"),
        ("compare", {"seeds": (0, 0)}, r"--seeds 0 0 is invalid: it repeats a seed"),
        ("compare", {"seeds": (-1,)}, r"--seeds \[-1\] is invalid: seeds are integers >= 0"),
        ("compare", {"policies": ()}, r"nothing to compare"),
        ("compare", {"policies": ("weighted_sum", "weighted_sum")}, r"\['weighted_sum'\] are given twice"),
        ("compare", {"bootstrap_reps": 0}, r"--bootstrap-reps=0 is invalid"),
        ("validate_world", {"seeds": ()}, r"--seeds is empty"),
        ("validate_world", {"knob_presets": ("bogus",)}, r"--knob-presets \['bogus'\] unknown"),
        ("validate_world", {"early_metric": "bogus/metric"}, r"--early-metric 'bogus/metric' is not a per-user metric"),
        ("validate_world", {"claims": ("a", "z")}, r"--claims \['z'\] unknown"),
        ("report", {"bootstrap_reps": -5}, r"--bootstrap-reps=-5 is invalid"),
        ("benchmark", {"steps": 0}, r"--steps=0 is invalid: must be >= 1"),
        ("benchmark", {"latency_requests": 0}, r"--latency-requests=0 is invalid"),
        ("evaluate", {"constant": ("explore_share=5",)}, r"--constant 'explore_share=5': the value must be a number"),
        ("evaluate", {"constant": ("explore_share=abc",)}, r"--constant 'explore_share=abc': the value must be"),
    ],
)
def test_scripts_refuse_bad_arguments_before_any_work(script: str, kwargs: dict, pattern: str, tmp_path: Path):
    """Each of these used to fail only after the rollouts (an IndexError or scipy's error), or not at all."""
    mod = load_script(script)
    base = {"compare": {"preset": "tiny", "users": 4, "out": tmp_path, "progress": False},
            "validate_world": {"preset": "tiny", "users": 4, "progress": False},
            "report": {"run": tmp_path},
            "benchmark": {"presets": ("tiny",), "batch_sizes": (1,), "progress": False},
            "evaluate": {"preset": "tiny", "out": tmp_path}}[script]
    with pytest.raises(ValueError, match=pattern):
        mod.main(mod.Args(**base, **kwargs))
    assert not any(tmp_path.iterdir())


def test_compare_main(tmp_path: Path):
    compare = load_script("compare")
    rows = compare.main(compare.Args(preset="tiny", users=4, seeds=(0,), out=tmp_path, bootstrap_reps=50,
                                     progress=False))
    assert {r["policy"] for r in rows} == {"weighted_sum", "engagement", "random", "true_scores"}
    for f in ("report.md", "results.json", "metrics.png", "retention_by_day.png", "paired_differences.png",
              "knob_usage.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    with pytest.raises(ValueError, match="users"):
        compare.main(compare.Args(preset="tiny", users=1, out=tmp_path))


def test_main_job_trains_evaluates_and_logs_offline(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    main = load_script("main")
    # CEM: 2 iterations of 51,200 requests; the agents' anchor: its mean after the 101,376 PPO leaves it (1)
    args = main.Args(preset="tiny", timesteps=1024, cem_budget=102_400, num_envs=8, users=4, seeds=(0,), out=tmp_path,
                     baselines=("weighted_sum",), wandb_mode="offline", dataset_users=8, dataset_steps=20,
                     cql_steps=20, discrete=True, shift=True, shift_users=4)
    rows = main.main(args)
    agents = {"ppo", "ppo_discrete", "cql", "cql_discrete"}
    assert {r["policy"] for r in rows} == {*agents, "cem_tuned", "weighted_sum"}
    assert (tmp_path / "ppo_discrete" / "checkpoint.zip").exists() and (tmp_path / "cql_discrete" / "cql.d3").exists()
    verdicts = json.loads((tmp_path / "verdicts.json").read_text())["verdicts"]
    # each agent judged against the weighted-sum and CEM-tuned baselines, and on the unseen-user world
    assert sorted((v["agent"], v["baseline"]) for v in verdicts) == sorted(
        (a, b) for a in agents
        for b in ("weighted_sum", "cem_tuned", "weighted_sum (tiny-shift)", "cem_tuned (tiny-shift)"))
    assert all(isinstance(v["beats"], bool) for v in verdicts)
    shift_report = (tmp_path / "shift" / "report.md").read_text()
    assert "tiny-shift" in shift_report and "ppo_discrete" in shift_report
    assert (tmp_path / "ppo" / "checkpoint.zip").exists() and (tmp_path / "cql" / "cql.d3").exists()
    assert (tmp_path / "dataset" / "meta.json").exists()
    # the agents start from CEM's mean after its first iteration (PPO's residual anchor and the centre of the
    # logging policy); CEM-tuned is the mean after its second
    cem = json.loads((tmp_path / "cem.json").read_text())
    cem_action, anchor = cem["action"], cem["means"][0]
    assert cem["iter_steps"] == 51_200 and len(cem["means"]) == 2 and cem["means"][1] == cem_action != anchor
    assert json.loads((tmp_path / "ppo" / "checkpoint.json").read_text())["params"]["anchor"] == anchor
    np.testing.assert_allclose(json.loads((tmp_path / "dataset" / "meta.json").read_text())["behaviour"]["mean"],
                               anchor)
    assert "CEM-tuned 102400 steps; PPO from CEM's mean after 101376 steps, 1024 steps" in (
        tmp_path / "report.md").read_text()
    assert (tmp_path / "report.md").read_text().count("retention/retained_30d") == 1
    # each table holds the runs of its own world: weighted-sum's rows equal a rollout made here (the main
    # world's ran in the background while the agents trained, the shifted world's too)
    from agents.policies import ConstantKnobs, WeightedSum
    from agents.rollouts import rollout
    from envs.learned import with_pipeline

    shift_rows = json.loads((tmp_path / "shift" / "results.json").read_text())
    for preset, table in (("tiny", rows), ("tiny-shift", shift_rows)):
        mine = rollout(WeightedSum(), with_pipeline(main.make_config(preset), "preset"), 4, 0)
        got = [r["mean"] for r in table if r["policy"] == "weighted_sum" and r["metric"] == "engagement/watch_minutes"]
        assert got == [pytest.approx(float(mine.per_user["engagement/watch_minutes"].mean()), rel=1e-12)], preset
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), "offline wandb run was not written"
    tables = list(runs[0].glob("files/media/table/eval/table_*.table.json"))
    assert len(tables) == 1, "the evaluation table was not logged as a wandb Table"
    assert list(runs[0].glob("files/media/table/eval/tiny-shift/table_*.table.json")), "no shifted-world table"
    from agents.sinks import METRICS_FILE, read_metrics

    logged = read_metrics(tmp_path / METRICS_FILE)
    assert "eval/retention.retained_30d/weighted_sum" in logged
    assert "eval/tiny-shift/retention.retained_30d/weighted_sum" in logged
    # each stage's wall time: CEM, the log, CQL, PPO, the evaluation
    assert {f"perf/stage_s/{k}" for k in ("cem", "dataset", "cql", "ppo", "evaluation")} <= set(logged)
    table = json.loads(tables[0].read_text())
    assert table["columns"][:3] == ["metric", "policy", "mean"]
    assert {row[1] for row in table["data"]} == {*agents, "cem_tuned", "weighted_sum"}
    # the artifacts' staged copies (PPO, CQL, the dataset) stay in the output directory, not ~/.local/share/wandb
    assert len(list((tmp_path / "wandb" / "artifact-staging" / "artifacts" / "staging").iterdir())) >= 3
    assert "WANDB_DATA_DIR" not in os.environ

    # every rollout was stored as it ended; the same job run again (an interrupted one resumed) reads them all:
    # the agents' (resumed: the same parameters), CEM's and the baselines', and prints the same table; without
    # --shift (the default) there are no verdicts on the shifted world
    stored = sorted(p.name.rsplit("-", 1)[0] for p in (tmp_path / "rollouts").glob("*.npz"))
    assert stored == sorted(f"{p}-{w}-seed0" for w in ("tiny", "tiny-shift")
                            for p in (*agents, "cem_tuned", "weighted_sum"))
    import agents.rollouts as ro

    def no_rollout(*a, **k):
        raise AssertionError("a stored rollout was run again")

    with monkeypatch.context() as m:
        m.setattr(ro, "rollout", no_rollout)
        again = main.main(dataclasses.replace(args, wandb_mode="disabled", shift=False))
    assert all("shift" not in v["baseline"] for v in json.loads((tmp_path / "verdicts.json").read_text())["verdicts"])
    assert [(r["policy"], r["metric"], r["mean"], r.get("diff")) for r in again] == [
        (r["policy"], r["metric"], r["mean"], r.get("diff")) for r in rows]

    # resuming reuses the tuned vector (cem.json matches config, budget and seed), and so does another anchor
    # budget (the stored means answer it); another CEM budget tunes again
    from agents.sinks import NoopSink

    def no_tuning(*a, **k):
        raise AssertionError("CEM ran again although cem.json matched")

    monkeypatch.setattr(main, "cem_tune", no_tuning)
    tcfg = main.make_config("tiny").replace(reward={"mode": args.train_reward})

    def tuned(**change) -> list[list[float]]:
        return [[float(x) for x in v] for v in main._cem(dataclasses.replace(args, **change), tcfg, NoopSink())]

    assert tuned() == [cem_action, anchor]
    assert tuned(anchor_budget=102_400) == [cem_action, cem_action]
    assert tuned(anchor_budget=0) == tuned(timesteps=60_000) == [cem_action, [0.0] * 13]  # no whole iteration
    with pytest.raises(AssertionError, match="CEM ran again"):
        tuned(cem_budget=51_200)
    for bad, pattern in (({"anchor_budget": 102_401}, r"anchor_budget=102401 is invalid.*in 0\.\.102400"),
                         ({"anchor_budget": -2}, "anchor_budget=-2 is invalid"),
                         ({"timesteps": 102_401}, r"cem_budget=102400 is below the PPO budget")):
        with pytest.raises(ValueError, match=pattern):
            main.main(dataclasses.replace(args, **bad))

    # the saved agents, loaded back, evaluated on the unseen-user world by scripts/compare.py
    compare = load_script("compare")
    # cem.json@STEPS is the search's mean after STEPS requests (the agents' anchor at 51,200 here); --against
    # judges the agents against it too
    paths = (*(str(tmp_path / a) for a in sorted(agents)), str(tmp_path / "cem.json"), f"cem_again={tmp_path}/cem.json",
             f"{tmp_path}/cem.json@51200", f"cem_start={tmp_path}/cem.json@51199")
    rows = compare.main(compare.Args(preset="tiny-shift", users=4, seeds=(0,), agents=paths, out=tmp_path / "cmp",
                                     policies=("weighted_sum",), bootstrap_reps=50, progress=False,
                                     against=("cem_tuned", "cem_anchor")))
    assert {r["policy"] for r in rows} == {*agents, "cem_tuned", "cem_again", "cem_anchor", "cem_start", "weighted_sum"}
    by = {(r["policy"], r["metric"]): r["mean"] for r in rows}  # NAME=PATH names a copy of the same vector
    assert by[("cem_again", "retention/retained_30d")] == by[("cem_tuned", "retention/retained_30d")]
    start = rollout(ConstantKnobs(anchor, "cem_anchor"), with_pipeline(main.make_config("tiny-shift"), "preset"), 4, 0)
    assert by[("cem_anchor", "engagement/watch_minutes")] == pytest.approx(
        float(start.per_user["engagement/watch_minutes"].mean()), rel=1e-12)
    judged = json.loads((tmp_path / "cmp" / "verdicts.json").read_text())["verdicts"]
    assert sorted({v["baseline"] for v in judged}) == ["cem_anchor", "cem_tuned", "weighted_sum"]
    assert {v["agent"] for v in judged} == {*agents, "cem_again", "cem_start"}
    old = {k: v for k, v in json.loads((tmp_path / "cem.json").read_text()).items() if k != "means"}
    (tmp_path / "old_cem.json").write_text(json.dumps(old))  # tuned before the means were kept
    for bad, pattern in (({"agents": (f"{tmp_path}/cem.json@many",)}, "after '@' comes the number of CEM requests"),
                         ({"agents": (f"{tmp_path}/old_cem.json@0",)}, "does not keep the search's mean"),
                         ({"agents": (f"{tmp_path}/cem.json@1000000",)}, "but the search ran 2"),
                         ({"agents": (str(tmp_path / "cem.json"),), "against": ("nobody",)}, "--against nobody")):
        with pytest.raises(ValueError, match=pattern):
            compare.main(compare.Args(preset="tiny", users=4, seeds=(0,), policies=("weighted_sum",),
                                      out=tmp_path / "cmp3", **bad))
    with pytest.raises(ValueError, match="baselines' names"):
        compare.main(compare.Args(preset="tiny", users=4, seeds=(0,), agents=(f"weighted_sum={tmp_path}/cem.json",),
                                  policies=("weighted_sum",), out=tmp_path / "cmp2"))
    for bad in ({"seeds": (0, 0)}, {"baselines": ("random", "random")}):
        with pytest.raises(ValueError, match="repeats a"):
            main.main(dataclasses.replace(args, **bad))
    meta = json.loads((tmp_path / "ppo" / "checkpoint.json").read_text())
    (tmp_path / "ppo" / "checkpoint.json").write_text(json.dumps({**meta, "env_version": "v-old"}))
    with pytest.raises(ValueError, match="env version 'v-old'"):
        compare.main(compare.Args(preset="tiny", users=4, seeds=(0,), agents=(str(tmp_path / "ppo"),), out=tmp_path))


def test_main_job_only_cem_tunes_and_stops(tmp_path: Path):
    main = load_script("main")
    args = main.Args(preset="tiny", timesteps=2048, cem_budget=0, num_envs=8, users=4, seeds=(0,), out=tmp_path,
                     only_cem=True, wandb_mode="disabled", dataset_users=8)
    assert main.main(args) == []
    cem = json.loads((tmp_path / "cem.json").read_text())
    assert len(cem["action"]) == 13 and cem["seed"] == args.train_seed and cem["budget_steps"] == 2048
    assert not any((tmp_path / f).exists() for f in ("ppo", "dataset", "report.md"))
    assert cem["paired"] is True and cem["guardrails"] == {"regret_tol": args.regret_tol,
                                                            "reach_tol": args.reach_tol, "z": 1.645}
    main.main(dataclasses.replace(args, cem_guardrails=False))  # another search: not the stored vector's
    guarded, cem = cem, json.loads((tmp_path / "cem.json").read_text())
    assert cem["guardrails"] is None
    assert guarded["action"] != cem["action"]
    main.main(dataclasses.replace(args, cem_paired=False))  # unpaired: another search
    assert json.loads((tmp_path / "cem.json").read_text())["paired"] is False
    assert cem["code"] == json.loads((tmp_path / "cem.json").read_text())["code"]  # the code that tuned it
    with pytest.raises(ValueError, match=r"cem_guard_z=-1\.0 is invalid"):
        main.main(dataclasses.replace(args, cem_guard_z=-1.0))
    with pytest.raises(ValueError, match="only-cem"):
        main.main(dataclasses.replace(args, cem=False, anchor="weighted_sum"))


def test_validate_world_main_reports_every_claim(tmp_path: Path):
    vw = load_script("validate_world")
    args = vw.Args(preset="tiny", users=6, seeds=(0,), knob_presets=("watch_time",), bootstrap_reps=50,
                   progress=False, out=tmp_path)
    res = vw.main(args)
    assert [c["claim"] for c in res["claims"]] == ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
    assert all(isinstance(c["pass"], bool) and c["rows"] for c in res["claims"] if c["claim"] not in "fg")
    g = next(c for c in res["claims"] if c["claim"] == "g")
    assert not g["pass"] and g["note"].startswith("not run")  # no headroom.json given
    assert json.loads((tmp_path / "results.json").read_text())["users"] == 6
    # the pure-engagement arm really ran another pipeline: its topic entropy differs from the baseline's
    assert res["means"]["engagement"]["slate/topic_entropy"] != res["means"]["weighted_sum"]["slate/topic_entropy"]
    with pytest.raises(ValueError, match="users"):
        vw.main(vw.Args(preset="tiny", users=1, progress=False))
    # a subset of the claims runs only the policies they need; with a store, a second run reads them back
    store = tmp_path / "store"
    sub_args = vw.Args(preset="tiny", users=6, seeds=(0,), claims=("d",), bootstrap_reps=50, progress=False,
                       store=store)
    sub = vw.main(sub_args)
    assert [c["claim"] for c in sub["claims"]] == ["d"] and sorted(sub["means"]) == ["no_diversity_rules",
                                                                                       "weighted_sum"]
    assert sub["means"]["weighted_sum"] == res["means"]["weighted_sum"]
    stored = sorted(store.rglob("*.npz"))
    assert len(stored) == 2
    mtimes = [p.stat().st_mtime_ns for p in stored]
    assert vw.main(sub_args)["means"] == sub["means"]
    assert [p.stat().st_mtime_ns for p in stored] == mtimes  # read, not recomputed and rewritten


def test_benchmark_retrieval_recall_reaches_one_when_every_list_is_probed():
    """The retrieval measurement on an IVF index: latency per nprobe, and recall against exact search
    that grows with the lists probed and is 1 when all are."""
    from envs.config import make_config

    bm = load_script("benchmark")
    cfg = make_config("tiny", pipeline={"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 1})
    rows = bm.measure_retrieval(cfg, queries=10, recall_queries=8, seed=0, nprobes=(4, 16))
    assert [r.nprobe for r in rows] == [1, 4, 16]
    assert all(r.p99_ms >= r.p50_ms > 0 and r.k == cfg.pipeline.n_interest for r in rows)
    assert rows[0].recall <= rows[1].recall <= rows[2].recall
    assert rows[2].recall == pytest.approx(1.0) and rows[0].recall < 1.0
    md = bm.render_benchmark(bm.Results(retrieval=rows, machine=bm.machine_info()), bm.Console(width=200))
    assert "| tiny | content | ivf | 16 |" in md


def test_main_job_twice_from_scratch_gives_the_same_bits(tmp_path: Path):
    """Same seed, same bits: the main job run twice in fresh folders tunes the same CEM vector, logs the same
    dataset, trains the same agents and writes the same verdicts (issue 31 point 8)."""
    main = load_script("main")
    outs = []
    for name in ("a", "b"):
        args = main.Args(preset="tiny", timesteps=512, cem_budget=51_200, num_envs=8, users=4, seeds=(0,),
                         out=tmp_path / name, baselines=("weighted_sum",), wandb_mode="disabled", dataset_users=8,
                         dataset_steps=10, cql_steps=10, progress=False)
        rows = main.main(args)
        outs.append((args.out, [(r["policy"], r["metric"], r["mean"], r.get("diff")) for r in rows
                                if not r["metric"].startswith("perf/")]))  # wall-clock latencies differ
    (a, rows_a), (b, rows_b) = outs
    assert rows_a == rows_b
    for f in ("cem.json", "verdicts.json", "dataset/meta.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    from agents.loading import load_agent

    for agent in ("ppo", "cql"):  # the same networks (SB3's zip also records its start time, so not its bytes)
        fp = load_agent(a / agent).fingerprint()
        assert fp["params"] and fp == load_agent(b / agent).fingerprint(), agent


def test_sweep_tabulates_a_world_parameter_and_a_script_flag(tmp_path: Path):
    """A world-parameter sweep and a script sweep (compare.py's --users) on the in-process executor: one table,
    one plot, one row per value and policy; the world sweep's rows are those of evaluating each world alone."""
    sw = load_script("sweep")
    rows = sw.main(sw.Args(world="users.patience_videos", values=("40", "160"), preset="tiny", users=4, seeds=(0,),
                           policies=("weighted_sum", "random"), bootstrap_reps=50, out=tmp_path / "w",
                           wandb_mode="disabled", progress=False))
    assert [(r["value"], r["policy"]) for r in rows] == [(v, p) for v in ("40", "160") for p in ("weighted_sum",
                                                                                                "random")]
    from agents.evaluation import evaluate
    from agents.policies import make_baseline

    cfg = sw.make_config("tiny").replace(users={"patience_videos": 160})
    alone = evaluate([make_baseline("weighted_sum", seed=1000)], cfg, 4, (0,), progress=False)
    assert rows[2]["mean"] == pytest.approx(float(alone.per_user("weighted_sum", "retention/retained_30d").mean()))
    md = (tmp_path / "w" / "sweep.md").read_text()
    assert "| users.patience_videos | weighted_sum | random |" in md and (tmp_path / "w" / "sweep.png").is_file()
    srows = sw.main(sw.Args(script="compare", flag="users", values=("3", "4"), out=tmp_path / "s",
                            args="--preset tiny --seeds 0 --policies weighted_sum random --bootstrap-reps 50",
                            wandb_mode="disabled", progress=False))
    assert [(r["value"], r["policy"]) for r in srows] == [(v, p) for v in ("3", "4") for p in ("weighted_sum",
                                                                                              "random")]
    assert json.loads((tmp_path / "s" / "users=4" / "results.json").read_text())
    with pytest.raises(ValueError, match="exactly one of --world"):
        sw.main(sw.Args(values=("1",)))
    with pytest.raises(ValueError, match="sets --out"):
        sw.main(sw.Args(script="compare", flag="users", values=("3",), args="--out x"))


def test_sweep_points_of_the_main_job_parse_with_wandb_off(tmp_path: Path):
    """Every point of a main-job sweep parses as main.py's command line does (a named configuration's defaults
    included; main.py takes no wandb flag) and runs with wandb off: wandb is the sweep driver's."""
    sw = load_script("sweep")
    main = load_script("main")
    job = sw.ScriptRun(str(ROOT), "main", ("--config", "from-scratch", "--cem-budget", "600000", "--out",
                                           str(tmp_path / "p"), "--executor", "local", "--no-progress"), "600000")
    a = sw.parse_point(main, job)
    assert (a.cem_budget, a.wandb_mode, a.out) == (600000, "disabled", tmp_path / "p")
    assert a.anchor == main.parse_cli(["--config", "from-scratch"]).anchor == "weighted_sum"  # the config's defaults
    with pytest.raises(ValueError, match="sets --out"):
        sw.main(sw.Args(script="main", flag="cem-budget", values=("1",), args="--out x", out=tmp_path / "s",
                        wandb_mode="disabled", progress=False))


def test_calibration_probe_reports_the_targets_of_a_changed_world(tmp_path: Path):
    """The calibration probe runs the baseline on the preset with changed parameters (its rankers serve the changed
    world) and writes what it prints; a longer watch-fraction intercept watches more per video, a malformed or
    unknown setting is refused by name."""
    cal = load_script("calibrate")
    lo = cal.main(cal.Args(preset="tiny", users=8, set=("users.watch_bias=-1.0",), out=tmp_path / "lo.json"))
    hi = cal.main(cal.Args(preset="tiny", users=8, set=("users.watch_bias=1.5",)))
    assert set(lo) == set(cal.TARGETS) and lo["engagement/complete_rate"] < hi["engagement/complete_rate"]
    assert json.loads((tmp_path / "lo.json").read_text())["figures"] == lo
    with pytest.raises(ValueError, match="malformed"):
        cal.main(cal.Args(preset="tiny", users=8, set=("users.watch_bias",)))
    with pytest.raises(ValueError, match=r"no field 'users\.nope'"):
        cal.main(cal.Args(preset="tiny", users=8, set=("users.nope=1",)))
