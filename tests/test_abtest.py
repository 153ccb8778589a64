"""The A/B-testing lab: assignment, bad input, keyed truth runs, CUPED and the script end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.abtest import (
    Arm,
    DailyOutcomes,
    EmptyArmError,
    Experiment,
    ExperimentError,
    check_experiments,
    cuped,
    readout,
    run_lab,
    true_effects,
)
from envs.config import make_config


def _exp(name: str = "e", knobs: dict | None = None, start: float = 0.0) -> Experiment:
    return Experiment(name, (Arm("control", 0.5), Arm("treat", 0.5, knobs or {"break_prompt": 1.0})), start)


def test_bad_experiments_raise_named_errors(tmp_path) -> None:
    with pytest.raises(EmptyArmError, match="no traffic"):
        Experiment("e", (Arm("control", 1.0), Arm("treat", 0.0)))
    with pytest.raises(ExperimentError, match=r"sum to 0\.9"):
        Experiment("e", (Arm("control", 0.5), Arm("treat", 0.4)))
    with pytest.raises(ExperimentError, match="unknown knob 'volume'"):
        Arm("treat", 0.5, {"volume": 1.0})
    with pytest.raises(ExperimentError, match="control and at least one"):
        Experiment("e", (Arm("control", 1.0),))
    with pytest.raises(ExperimentError, match="same name"):
        Experiment("e", (Arm("a", 0.5), Arm("a", 0.5)))
    with pytest.raises(ExperimentError, match="distinct names"):
        check_experiments([_exp("x"), _exp("x")])
    from scripts.ab_test import load_spec

    bad = tmp_path / "spec.json"
    bad.write_text("{not json")
    with pytest.raises(ExperimentError, match="cannot read"):
        load_spec(bad)
    bad.write_text(json.dumps([{"name": "e", "arms": [{"name": "a"}]}]))
    with pytest.raises(ExperimentError, match="lacks a field"):
        load_spec(bad)


def test_assignment_follows_the_split_and_experiments_are_independent() -> None:
    users = np.arange(20000)
    a = Experiment("a", (Arm("c", 0.8), Arm("t", 0.2))).assign(users)
    b = _exp("b").assign(users)
    np.testing.assert_array_equal(a, Experiment("a", (Arm("c", 0.8), Arm("t", 0.2))).assign(users))
    assert abs(a.mean() - 0.2) < 0.01 and abs(b.mean() - 0.5) < 0.015
    # overlapping layers: b's split is the same inside each arm of a
    assert abs(b[a == 1].mean() - b[a == 0].mean()) < 0.03


def test_cuped_keeps_the_mean_and_cuts_the_variance() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    y = 2.0 * x + rng.normal(size=5000) + 3.0
    adj = cuped(y, x)
    assert adj.mean() == pytest.approx(y.mean()) and adj.var() < 0.25 * y.var()
    np.testing.assert_array_equal(cuped(y, np.ones(5000)), y)  # a constant covariate adjusts nothing


def test_truth_runs_pair_users_and_a_no_op_arm_has_no_effect() -> None:
    cfg = make_config("tiny", horizon_days=3.0)
    noop = Experiment("noop", (Arm("control", 0.5), Arm("same", 0.5, {"break_prompt": 0.0})))
    rows, runs = true_effects(cfg, [noop, _exp("b")], 24, seed=1, days=(1.0, 3.0))
    for r in (r for r in rows if r["experiment"] == "noop"):
        assert r["diff"] == 0.0 and r["lo"] == r["hi"] == 0.0  # the same users under the same noise
    np.testing.assert_array_equal(runs["noop=same"].minutes, runs["control"].minutes)
    assert {"control", "b=treat", "both"} <= set(runs)
    again = run_lab(cfg, [noop, _exp("b")], 24, seed=1, forced={"noop": 0, "b": 0})
    np.testing.assert_array_equal(again.minutes, runs["control"].minutes)
    with pytest.raises(ExperimentError, match="forced arm"):
        run_lab(cfg, [noop], 24, seed=1, forced={"noop": 5})


def test_readout_rows_srm_and_correction() -> None:
    e = _exp("e", start=1.0)
    rng = np.random.default_rng(3)
    n = 400
    out = DailyOutcomes(rng.gamma(2.0, 10.0, (n, 5)), np.where(rng.random(n) < 0.2, 2.5, np.inf))
    rows = readout(out, [e], day=2.0, pre_days=1.0)
    assert [r["metric"] for r in rows] == ["watch_minutes", "retained"]
    assert all(r["cuped"] and r["n"] == n and r["p_adj"] >= r["p"] and r["decision"] in ("flat", "better", "worse")
               for r in rows)
    assert rows[0]["srm_p"] > 0.01
    # a treatment that adds 30 minutes a day to its users is found
    arm = e.assign(np.arange(n))
    out.minutes[arm == 1, 1:3] += 30.0
    up = readout(out, [e], day=2.0)[0]
    assert up["decision"] == "better" and up["lo"] > 40.0
    dead = DailyOutcomes(out.minutes, np.full(n, 0.5))  # nobody is exposed
    with pytest.raises(EmptyArmError, match="exposed users"):
        readout(dead, [e], day=1.0)


def test_ab_test_script_end_to_end(tmp_path) -> None:
    from scripts.ab_test import Args, main

    rep = main(Args(preset="tiny", users=16, days=(1.0,), pre_days=1.0, out=tmp_path, progress=False))
    assert (tmp_path / "ab.json").exists() and (tmp_path / "ab.png").exists() and (tmp_path / "report.md").exists()
    assert {r["experiment"] for r in rep["platform"]} == {"engagement_vs_weighted_sum", "break_prompts"}
    assert any(r["arm"] == "interaction" for r in rep["truth"])
