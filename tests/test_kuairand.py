"""KuaiRand-Pure schema loader: reads a fixture written in that schema, maps every signal as documented,
and rejects a file with missing columns by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rankers.kuairand import KUAIRAND_COLUMNS, KuaiRandSchemaError, load_kuairand
from rankers.labels import validate_rows
from rankers.model_eval import predict_rows
from rankers.models import ModelConfig
from rankers.training import TrainConfig, train_ranker

MIN = 60_000


def _fixture(n_users: int = 3, per_user: int = 8, seed: int = 0) -> pd.DataFrame:
    """Rows in KuaiRand-Pure's column order, shuffled (the loader sorts by user and time)."""
    rng = np.random.default_rng(seed)
    recs = []
    for u in range(n_users):
        t = 1_649_000_000_000 + u * 10 * MIN
        for i in range(per_user):
            t += (45 * MIN) if i == 4 else 20_000  # a 45-minute gap before the 5th exposure: a new session
            dur = int(rng.integers(5_000, 60_000))
            play = int(rng.integers(0, dur))
            recs.append({"user_id": 100 + u, "video_id": int(rng.integers(0, 5)), "date": 20220408, "hourmin": 1200,
                         "time_ms": t, "is_click": int(play > 3000), "is_like": int(rng.random() < 0.3),
                         "is_follow": int(rng.random() < 0.2), "is_comment": int(rng.random() < 0.2),
                         "is_forward": int(rng.random() < 0.2), "is_hate": int(rng.random() < 0.2),
                         "long_view": int(play > 0.5 * dur), "play_time_ms": play, "duration_ms": dur,
                         "profile_stay_time": 0, "comment_stay_time": 0, "is_profile_enter": 0,
                         "is_rand": int(rng.random() < 0.1), "tab": 1})
    df = pd.DataFrame.from_records(recs, columns=list(KUAIRAND_COLUMNS))
    return df.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def test_reads_fixture_and_maps_signals(tmp_path: Path):
    df = _fixture()
    # hand-set rows for the thresholds: a complete view (>= 80 %), a skip (< 2 s), zero duration
    df.loc[0, ["play_time_ms", "duration_ms"]] = [8_000, 10_000]
    df.loc[1, ["play_time_ms", "duration_ms"]] = [1_999, 10_000]
    df.loc[2, ["play_time_ms", "duration_ms"]] = [500, 0]
    path = tmp_path / "log_standard_fixture.csv"
    df.to_csv(path, index=False)
    rows = load_kuairand(path, emb_dim=4)
    assert validate_rows(rows) == len(df)
    # sorted by user, then time; steps count exposures per user
    order = np.lexsort((rows["time_ms"], rows["user_id"]))
    np.testing.assert_array_equal(order, np.arange(len(df)))
    np.testing.assert_array_equal(rows["step"], np.tile(np.arange(8), 3))
    src = df.sort_values(["user_id", "time_ms"]).reset_index(drop=True)
    play, dur = src["play_time_ms"].to_numpy(float), src["duration_ms"].to_numpy(float)
    np.testing.assert_allclose(rows["watch_s"], play / 1000.0, rtol=1e-6)
    np.testing.assert_array_equal(rows["complete"], (dur > 0) & (play >= 0.8 * dur))
    np.testing.assert_array_equal(rows["skip"], play < 2000)
    np.testing.assert_array_equal(rows["like"], src["is_like"] > 0)
    np.testing.assert_array_equal(rows["share"], src["is_forward"] > 0)
    np.testing.assert_array_equal(rows["comment"], src["is_comment"] > 0)
    np.testing.assert_array_equal(rows["follow"], src["is_follow"] > 0)
    np.testing.assert_array_equal(rows["regret"], src["is_hate"] > 0)
    np.testing.assert_array_equal(rows["explore"], src["is_rand"] > 0)
    assert rows["complete"].sum() >= 1 and rows["skip"].sum() >= 1
    zero_dur = dur == 0
    assert zero_dur.any() and (rows["watch_frac"][zero_dur] == 0).all() and not rows["complete"][zero_dur].any()
    assert ((rows["watch_frac"] >= 0) & (rows["watch_frac"] <= 1)).all()
    # two sessions per user (45-minute gap), session counters restart
    assert np.unique(rows["session_id"]).size == 6
    np.testing.assert_array_equal(rows["session_videos"], np.tile([0, 1, 2, 3, 0, 1, 2, 3], 3))
    # the video's logged counter: earlier exposures of the same video in the whole log (time order)
    t = rows["time_ms"]
    expect = [(rows["video_id"] == v) & (t < ti) for v, ti in zip(rows["video_id"], t)]
    np.testing.assert_array_equal(rows["impressions"], [e.sum() for e in expect])
    assert rows["user_emb"].shape == (len(df), 4) and rows["rates"].shape == (len(df), 7)
    np.testing.assert_allclose(rows["rates"][0], [0.05, 0.3, 0.3, 0.01, 0.005, 0.01, 0.4], rtol=1e-6)


def test_missing_columns_are_named(tmp_path: Path):
    path = tmp_path / "broken.csv"
    _fixture().drop(columns=["play_time_ms", "is_hate"]).to_csv(path, index=False)
    with pytest.raises(KuaiRandSchemaError, match=r"missing columns \['is_hate', 'play_time_ms'\]"):
        load_kuairand(path)


def test_empty_files_text_cells_and_rows_without_ids_are_named(tmp_path: Path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(KuaiRandSchemaError, match=r"empty file"):
        load_kuairand(empty)
    header = tmp_path / "header.csv"
    _fixture().iloc[:0].to_csv(header, index=False)
    with pytest.raises(KuaiRandSchemaError, match=r"no rows under the header"):
        load_kuairand(header)
    def with_cell(column: str, row: int, value: object) -> Path:
        """The fixture with one cell replaced, as a CSV (line ``row + 2``: the header is line 1)."""
        df = _fixture()
        df[column] = df[column].astype(object)
        df.loc[row, column] = value
        path = tmp_path / f"{column}-{row}.csv"
        df.to_csv(path, index=False)
        return path

    with pytest.raises(KuaiRandSchemaError, match=r"column 'is_like' holds 'yes' on line 5, not a number"):
        load_kuairand(with_cell("is_like", 3, "yes"))
    with pytest.raises(KuaiRandSchemaError, match=r"column 'user_id' is empty on line 4"):
        load_kuairand(with_cell("user_id", 2, np.nan))  # used to become user 0
    rows = load_kuairand(with_cell("is_hate", 1, np.nan))  # an empty flag still counts as 0
    assert len(rows["user_id"]) == len(_fixture())


def test_rankers_train_on_kuairand_rows(tmp_path: Path):
    path = tmp_path / "log.csv"
    _fixture(n_users=20, per_user=30, seed=1).to_csv(path, index=False)
    rows = load_kuairand(path, emb_dim=4)
    mc = ModelConfig(kind="ranker", emb_dim=4, n_topics=1, n_formats=1, id_buckets=64, hidden=16)
    model = train_ranker(rows, mc, TrainConfig(epochs=2, batch_size=128, progress=False))
    pred = predict_rows(model, rows)
    assert pred.shape == (600, 8) and np.isfinite(pred).all()
