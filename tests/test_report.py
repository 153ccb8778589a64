"""The run's local metric record (metrics.jsonl), learning curves, the saved comparison and
``scripts/report.py`` rebuilding a report from a finished run directory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.evaluation import evaluate
from agents.policies import ConstantKnobs, WeightedSum
from agents.report import (
    COMPARISON_FILE,
    curve_series,
    knob_usage_by_state,
    load_comparison,
    save_comparison,
    write_learning_curves,
    write_report,
)
from agents.rollouts import STATE_GROUPS
from agents.sinks import METRICS_FILE, NoopSink, RecordingSink, make_sink, read_metrics
from agents.stats import summarize
from envs.config import make_config
from rankers.config import N_KNOBS
from tests.helpers import CaptureSink
from tests.test_scripts import load_script

PLOTS = ("metrics.png", "paired_differences.png", "retention_by_day.png", "knob_usage.png",
         "knob_usage_by_state.png", "learning_curves.png")


@pytest.fixture(scope="module")
def comp():
    cfg = make_config("tiny", horizon_days=3.0, churn_days=2.0)
    policies = [WeightedSum(), ConstantKnobs(np.full(N_KNOBS, 0.5, np.float32), "half")]
    return evaluate(policies, cfg, 4, [0, 1], progress=False)


def _log_training(out: Path) -> None:
    sink = make_sink("disabled", out_dir=out)
    for i in range(4):
        sink.log({"train/returned_per_step": 0.1 * i, "losses/value_loss": 1.0 / (i + 1), "train/clip_range": 0.2},
                 step=1000 * i)
        sink.log({"losses/critic_loss": 2.0 - 0.3 * i, "losses/time_step": 0.01 * i}, step=10 * i)
        sink.log({"train/cem_iter": float(i), "train/cem_best_fitness": 0.5 + i}, step=i)
    sink.log({"eval/retention.retained_30d/ppo": 0.7}, step=4000)
    sink.finish()


def test_recording_sink_forwards_and_reads_back(tmp_path: Path):
    inner = CaptureSink()
    sink = RecordingSink(inner, tmp_path / METRICS_FILE)
    sink.log({"train/a": 1.0, "losses/b": np.float32(2.5)}, step=0)
    sink.log({"train/a": 3.0, "losses/b": float("nan")}, step=5)
    sink.finish()
    assert inner.logged[0] == ({"train/a": 1.0, "losses/b": np.float32(2.5)}, 0) and len(inner.logged) == 2
    assert inner.finished
    got = read_metrics(tmp_path / METRICS_FILE)
    assert got == {"train/a": ([0, 5], [1.0, 3.0]), "losses/b": ([0], [2.5])}  # NaN logged as null, dropped


def test_metrics_jsonl_tolerates_a_truncated_last_line_and_resumes(tmp_path: Path):
    path = tmp_path / METRICS_FILE
    sink = make_sink("disabled", out_dir=tmp_path)
    for s in range(3):
        sink.log({"train/x": float(s)}, step=s)
    sink.finish()
    full = path.read_text()
    with path.open("a") as f:  # a crash in the middle of a write
        f.write('{"step": 3, "time": 1.0, "metrics": {"train/x": 9')
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a truncated *last* line is skipped silently
        assert read_metrics(path) == {"train/x": ([0, 1, 2], [0.0, 1.0, 2.0])}
    # a resumed run appends: the truncated line is closed first, and a repeated step replaces the old value
    sink = make_sink("disabled", out_dir=tmp_path)
    sink.log({"train/x": 20.0}, step=2)
    sink.log({"train/x": 3.0}, step=3)
    sink.finish()
    text = path.read_text()
    assert text.startswith(full) and text.count("\n") == full.count("\n") + 3
    with pytest.warns(RuntimeWarning, match="skipped line 4"):
        got = read_metrics(path)
    assert got == {"train/x": ([0, 1, 2, 3], [0.0, 1.0, 20.0, 3.0])}


def test_make_sink_records_only_with_an_out_dir(tmp_path: Path):
    assert isinstance(make_sink("disabled"), NoopSink)
    assert isinstance(make_sink("disabled", out_dir=tmp_path, record=False), NoopSink)
    assert isinstance(make_sink("disabled", out_dir=tmp_path), RecordingSink)


def test_learning_curves_panels(tmp_path: Path):
    _log_training(tmp_path)
    series = curve_series(read_metrics(tmp_path / METRICS_FILE))
    # constant (clip_range), step counter (cem_iter), one-off eval and d3rlpy timing series are left out
    assert list(series) == ["train/cem_best_fitness", "train/returned_per_step", "losses/critic_loss",
                            "losses/value_loss"]
    assert series["losses/critic_loss"] == ([0, 10, 20, 30], pytest.approx([2.0, 1.7, 1.4, 1.1]))
    png = write_learning_curves(tmp_path / METRICS_FILE, tmp_path / "plots")
    assert png is not None and png.stat().st_size > 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert write_learning_curves(tmp_path / "missing.jsonl", tmp_path) is None


def test_comparison_round_trip_and_corruption(comp, tmp_path: Path):
    path = save_comparison(comp, tmp_path / COMPARISON_FILE, {"title": "t"})
    back, meta = load_comparison(path)
    assert meta == {"title": "t"} and back.baseline == comp.baseline and back.policies == comp.policies
    for a, b in zip(comp.runs, back.runs):
        assert (a.policy, a.seed, a.population) == (b.policy, b.seed, b.population)
        assert list(a.per_user) == list(b.per_user)
        for k in a.per_user:
            np.testing.assert_array_equal(a.per_user[k], b.per_user[k])
        np.testing.assert_array_equal(a.retention_by_day, b.retention_by_day)
        np.testing.assert_array_equal(a.knob_means, b.knob_means)
        for g in STATE_GROUPS:
            np.testing.assert_array_equal(a.knob_by_state[g], b.knob_by_state[g])
            np.testing.assert_array_equal(a.state_counts[g], b.state_counts[g])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_comparison(path)


def test_knob_usage_by_state_pools_seeds(comp):
    labels, means, counts = knob_usage_by_state(comp, "half")
    assert len(labels) == sum(len(v) for v in STATE_GROUPS.values()) == means.shape[1] == counts.shape[0]
    assert means.shape[0] == N_KNOBS
    np.testing.assert_allclose(means[:, counts > 0], 0.5, atol=1e-6)
    runs = [r for r in comp.runs if r.policy == "half"]
    assert counts[0] == sum(int(r.state_counts["user"][0]) for r in runs)


def test_report_script_rebuilds_a_finished_run(comp, tmp_path: Path):
    run = tmp_path / "run"
    _log_training(run)
    rows = summarize(comp, reps=100)
    write_report(comp, rows, run, "tiny report", "python scripts/main.py --quick")
    for f in (*PLOTS, "report.md", "results.json", COMPARISON_FILE):
        assert (run / f).stat().st_size > 0, f
    for f in (*PLOTS, "report.md"):
        (run / f).unlink()
    report = load_script("report")
    written = report.main(report.Args(run=run, print_table=False))
    assert written[0] == run / "report.md"
    for f in PLOTS:
        assert (run / f).stat().st_size > 0, f
    md = (run / "report.md").read_text()
    assert md.startswith("# tiny report") and "python scripts/main.py --quick" in md and "IQM Δ" in md
    assert "![learning_curves](learning_curves.png)" in md and "![knob_usage_by_state]" in md
    assert md.count("engagement/watch_minutes") == 1
    # into another directory, rows recomputed from the comparison
    other = tmp_path / "other"
    report.main(report.Args(run=run, out=other, recompute=True, bootstrap_reps=50, print_table=False))
    rows2: list[dict[str, Any]] = json.loads((other / "results.json").read_text())
    assert {r["policy"] for r in rows2} == {"weighted_sum", "half"}
    assert any(r.get("iqm") is not None for r in rows2)
    assert (other / COMPARISON_FILE).exists() and (other / "learning_curves.png").exists()


def test_report_script_without_a_comparison(tmp_path: Path):
    report = load_script("report")
    with pytest.raises(FileNotFoundError, match="neither"):
        report.main(report.Args(run=tmp_path))
    _log_training(tmp_path)
    assert report.main(report.Args(run=tmp_path)) == [tmp_path / "learning_curves.png"]
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
