"""Logged datasets: collection, propensities, on-disk format and its checks, d3rlpy and Minari."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from envs.config import ENV_VERSION, make_config
from envs.feed_env import MENU_MATRIX, MENU_NAMES
from offline_data import (
    CallablePolicy,
    ChecksumError,
    ConfigMismatchError,
    DatasetError,
    EnvVersionError,
    EpsilonMenu,
    GaussianKnobs,
    SchemaError,
    SchemaVersionError,
    collect,
    load_dataset,
    save_dataset,
    select_episodes,
    split_by_user,
    to_mdp_dataset,
)
from offline_data.dataset import IMPRESSION_SCHEMA, META_FILE, TRANSITION_SCHEMA, MetaError, PropensityError
from rankers.config import N_KNOBS
from rankers.fileio import file_sha256
from tests.test_scripts import load_script

# Short episodes with both churn (terminal) and the max_steps cap (timeout) inside a small budget.
CFG = make_config("tiny", churn_days=1.5, max_steps=8, users={"patience_videos": 8.0})
N_USERS, N_STEPS = 5, 30
MENU_SIZE = len(MENU_NAMES)


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _with(ds, table: str = "transitions", **arrays):
    """``ds`` with some arrays of one table replaced."""
    return dataclasses.replace(ds, **{table: dataclasses.replace(getattr(ds, table), **arrays)})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    collect(GaussianKnobs(0.3), CFG, n_users=N_USERS, n_steps=N_STEPS, seed=0, out=root / "cont")
    collect(EpsilonMenu(0.5), CFG, n_users=N_USERS, n_steps=N_STEPS, seed=0, out=root / "disc")
    return root


@pytest.fixture
def copy(data_dir: Path, tmp_path: Path):
    def _copy(name: str = "cont") -> Path:
        dst = tmp_path / name
        shutil.copytree(data_dir / name, dst)
        return dst

    return _copy


def _edit_meta(path: Path, **changes) -> None:
    meta = json.loads((path / META_FILE).read_text())
    meta.update(changes)
    (path / META_FILE).write_text(json.dumps(meta))


def _rewrite_npz(path: Path, name: str, mutate) -> None:
    with np.load(path / name) as z:
        arrays = {k: z[k] for k in z.files}
    mutate(arrays)
    np.savez(path / name, **arrays)
    meta = json.loads((path / META_FILE).read_text())
    meta["files"][name]["sha256"] = file_sha256(path / name)  # a consistent file, so the schema check runs
    (path / META_FILE).write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("name", ["cont", "disc"])
def test_round_trip_and_meta(data_dir: Path, name: str) -> None:
    ds = load_dataset(data_dir / name, expected_config=CFG, expected_discrete=name == "disc")
    meta, tr, imp = ds.meta, ds.transitions, ds.impressions
    for key in ("env_id", "preset", "config", "seed", "schema_version", "env_version", "git", "behaviour", "counts",
                "files", "dims"):
        assert key in meta, key
    assert meta["env_version"] == ENV_VERSION and meta["preset"] == "tiny" and meta["seed"] == 0
    assert meta["git"]["revision"]
    assert set(meta["files"]) == {"transitions.npz", "impressions.npz"}
    assert len(tr) == N_USERS * N_STEPS == meta["counts"]["transitions"]
    assert meta["counts"]["terminals"] > 0 and meta["counts"]["timeouts"] > 0 and meta["counts"]["cutoffs"] > 0
    # episode-major; within an episode next_observation is the next row's observation
    starts, ends = tr.episode_bounds()
    assert starts.size == meta["counts"]["episodes"] == np.unique(tr.episode_id).size
    inner = np.ones(len(tr), bool)
    inner[ends - 1] = False
    np.testing.assert_array_equal(tr.next_observations[:-1][inner[:-1]], tr.observations[1:][inner[:-1]])
    assert np.all((tr.terminals | tr.timeouts | tr.cutoffs)[ends - 1])
    assert not np.any(tr.terminals & tr.timeouts)
    if ds.discrete:
        assert tr.actions.dtype == np.int64
        np.testing.assert_array_equal(tr.knob_actions, MENU_MATRIX[tr.actions])
    else:
        np.testing.assert_array_equal(tr.actions, tr.knob_actions)
        assert np.all(np.abs(tr.actions) <= 1.0)
    # impressions point at their transition and agree with it
    assert len(imp) > 0
    ti = imp.transition_index
    np.testing.assert_array_equal(imp.episode_id, tr.episode_id[ti])
    np.testing.assert_array_equal(imp.user_id, tr.user_id[ti])
    np.testing.assert_array_equal(imp.step, tr.step[ti])
    assert np.all(imp.video_id >= 0) and np.all(imp.position < CFG.pipeline.slate_size)
    assert np.all(np.bincount(ti, minlength=len(tr)) <= CFG.pipeline.slate_size)
    assert np.all((imp.watch_frac >= 0) & (imp.watch_frac <= 1.0 + 1e-6))
    assert imp.user_emb.shape == (len(imp), CFG.corpus.emb_dim)
    assert np.all(imp.topic < CFG.corpus.n_topics) and np.all(imp.duration_s > 0)
    assert not np.any(imp.not_interested & ~imp.skip)


def test_impression_features_match_world_at_serving_time() -> None:
    """Features equal the catalog's (no uploads recycle ids in so short a run), and the logged
    impression counter is the video's value *before* the request: its start value plus the
    population-scaled count of its impressions in earlier requests."""
    from envs.simulator import FeedSimulator

    cfg, b = make_config("tiny"), 3
    ds = collect(GaussianKnobs(0.3), cfg, n_users=b, n_steps=5, autoreset=False, seed=3)
    assert ds.meta["counts"]["cutoffs"] == b  # nobody left early: every impression of the world is logged
    cat = FeedSimulator(cfg, b, seed=3).corpus.catalog  # the world before any request
    imp = ds.impressions
    np.testing.assert_array_equal(imp.topic, cat.topic[imp.video_id])
    np.testing.assert_array_equal(imp.creator, cat.creator[imp.video_id])
    np.testing.assert_array_equal(imp.format, cat.format[imp.video_id])
    np.testing.assert_array_equal(imp.duration_s, cat.duration_s[imp.video_id])
    scale = cfg.population / b
    earlier = np.array([np.sum((imp.video_id == v) & (imp.step < t)) for v, t in zip(imp.video_id, imp.step)])
    np.testing.assert_allclose(imp.impressions, cat.impressions[imp.video_id] + scale * earlier, rtol=1e-5)
    sim = FeedSimulator(cfg, b, seed=3)
    sim.reset()
    slot = {int(k): i for i, k in enumerate(sim.view.user_key)}
    first = imp.step == 0
    np.testing.assert_array_equal(imp.user_emb[first], sim.view.emb[[slot[int(u)] for u in imp.user_id[first]]])


def test_save_refuses_to_overwrite(data_dir: Path, copy) -> None:
    ds = load_dataset(data_dir / "cont")
    from offline_data import save_dataset

    with pytest.raises(FileExistsError):
        save_dataset(ds, data_dir / "cont")
    dst = copy("cont")
    save_dataset(ds, dst, overwrite=True)
    assert not list(dst.glob(".*.tmp"))
    load_dataset(dst)


def test_failed_overwrite_keeps_the_old_dataset(data_dir: Path, copy) -> None:
    """A save that fails its checks (a float64 reward column, NaN in meta) used to delete the old meta.json
    first: the old dataset was lost. Now it is checked before the directory is touched."""
    ds = load_dataset(data_dir / "cont")
    dst = copy("cont")
    before = _files(dst)
    with pytest.raises(SchemaError, match=r"'rewards'.*dtype float64, expected float32"):
        save_dataset(_with(ds, rewards=ds.transitions.rewards.astype(np.float64)), dst, overwrite=True)
    with pytest.raises(SchemaError, match=r"meta: x is nan .*strict JSON"):
        save_dataset(dataclasses.replace(ds, meta={**ds.meta, "x": float("nan")}), dst, overwrite=True)
    with pytest.raises(SchemaError, match=r"meta: 'discrete' is 'no', expected a JSON boolean"):
        save_dataset(dataclasses.replace(ds, meta={**ds.meta, "discrete": "no"}), dst, overwrite=True)
    assert _files(dst) == before
    np.testing.assert_array_equal(load_dataset(dst).transitions.rewards, ds.transitions.rewards)
    assert [p.name for p in dst.parent.iterdir()] == ["cont"]  # no temporary or stale directory left


@pytest.mark.parametrize(("name", "table", "key", "value", "pattern"), [
    ("cont", "transitions", "observations", np.nan, r"'observations'.* nan at row 0.*finite"),
    ("cont", "transitions", "next_observations", np.inf, r"'next_observations'.* inf at row 0.*finite"),
    ("cont", "transitions", "rewards", np.nan, r"'rewards'.* nan at row 3.*finite"),
    ("cont", "transitions", "actions", 1.5, r"'actions'.* 1\.5 at row 0.*\[-1, 1\]"),
    ("disc", "transitions", "actions", MENU_SIZE, rf"'actions'.* {MENU_SIZE} at row 3.*\[0, {MENU_SIZE}\)"),
    ("disc", "transitions", "actions", -1, rf"'actions'.* -1 at row 3.*\[0, {MENU_SIZE}\)"),
    ("cont", "impressions", "transition_index", N_USERS * N_STEPS, rf"'transition_index'.* {N_USERS * N_STEPS} "
     rf"at row 3.*\[0, {N_USERS * N_STEPS}\)"),
])
def test_save_rejects_bad_values_and_keeps_the_old_dataset(data_dir: Path, copy, tmp_path: Path, name: str,
                                                           table: str, key: str, value, pattern: str) -> None:
    ds = load_dataset(data_dir / name)
    a = getattr(getattr(ds, table), key).copy()
    a.flat[3] = value
    bad = _with(ds, table, **{key: a})
    with pytest.raises(SchemaError, match=pattern):
        save_dataset(bad, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    dst = copy(name)
    before = _files(dst)
    with pytest.raises(SchemaError, match=pattern):
        save_dataset(bad, dst, overwrite=True)
    assert _files(dst) == before
    load_dataset(dst)


def test_load_rejects_bad_values(copy) -> None:
    p = copy()
    _rewrite_npz(p, "transitions.npz", lambda a: a["rewards"].__setitem__(2, np.nan))
    with pytest.raises(SchemaError, match=r"'rewards'.* nan at row 2.*finite"):
        load_dataset(p)


def test_overwrite_swaps_so_a_complete_dataset_is_always_on_disk(data_dir: Path, copy, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """After each rename of the swap, the old dataset (at its name or ``.stale-0``) or the new one loads; a
    failure between the renames puts the old one back."""
    new = load_dataset(data_dir / "disc")
    dst = copy("cont")
    real, seen = os.rename, []

    def rename(src, dest):
        real(src, dest)
        seen.append({c.name: load_dataset(c).discrete for c in (dst, dst.with_name("cont.stale-0"))
                     if (c / META_FILE).exists()})

    monkeypatch.setattr(os, "rename", rename)
    save_dataset(new, dst, overwrite=True)
    assert seen == [{"cont.stale-0": False}, {"cont": True, "cont.stale-0": False}]
    assert load_dataset(dst).discrete and [p.name for p in tmp_path.iterdir()] == ["cont"]

    calls = []

    def fails_second(src, dest):
        calls.append(Path(dest).name)
        if len(calls) == 2:
            raise OSError("disk gone")
        real(src, dest)

    monkeypatch.setattr(os, "rename", fails_second)
    before = _files(dst)
    with pytest.raises(OSError, match="disk gone"):
        save_dataset(load_dataset(data_dir / "cont"), dst, overwrite=True)
    assert calls == ["cont.stale-0", "cont", "cont"]  # aside, (fails), back
    assert _files(dst) == before and load_dataset(dst).discrete
    assert [p.name for p in tmp_path.iterdir()] == ["cont"]


def test_save_never_deletes_other_files(data_dir: Path, copy, tmp_path: Path) -> None:
    ds = load_dataset(data_dir / "cont")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not a dataset directory.*notes\.txt"):
        save_dataset(ds, other)
    assert _files(other) == {"notes.txt": b"mine"}
    dst = copy("cont")
    (dst / "notes.txt").write_text("mine")
    save_dataset(ds, dst, overwrite=True)
    assert (tmp_path / "cont.stale-0" / "notes.txt").read_text() == "mine"  # kept with the old dataset
    load_dataset(tmp_path / "cont.stale-0")
    load_dataset(dst)


def test_collect_checks_meta_and_target_before_collecting(copy, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in ``extra_meta`` used to fail after the .npz files were written, leaving no meta.json."""
    oc = importlib.import_module("offline_data.collect")  # the module (the package's ``collect`` is the function)
    monkeypatch.setattr(oc, "_collect_world", lambda *a, **k: pytest.fail("collected although the input is bad"))
    dst = copy("cont")
    before = _files(dst)
    kw = dict(n_users=2, n_steps=2)
    with pytest.raises(SchemaError, match=r"extra_meta: x is nan .*strict JSON"):
        collect(GaussianKnobs(0.3), CFG, **kw, out=dst, overwrite=True, extra_meta={"x": float("nan")})
    with pytest.raises(SchemaError, match=r"extra_meta: run\.lr is .*1\.0.* of type float32"):
        collect(GaussianKnobs(0.3), CFG, **kw, out=dst, overwrite=True, extra_meta={"run": {"lr": np.float32(1)}})
    with pytest.raises(FileExistsError, match=r"already holds a dataset"):
        collect(GaussianKnobs(0.3), CFG, **kw, out=dst)
    assert _files(dst) == before
    with pytest.raises(SchemaError, match=r"x is nan"):
        collect(GaussianKnobs(0.3), CFG, **kw, out=tmp_path / "new", extra_meta={"x": float("nan")})
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------------------------- corruption
def test_truncated_file(copy) -> None:
    p = copy()
    f = p / "transitions.npz"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ChecksumError, match=r"transitions\.npz"):
        load_dataset(p)


def test_flipped_bytes(copy) -> None:
    p = copy()
    f = p / "impressions.npz"
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))
    with pytest.raises(ChecksumError, match=r"impressions\.npz"):
        load_dataset(p)


def test_corrupt_but_checksum_skipped_still_errors(copy) -> None:
    p = copy()
    f = p / "transitions.npz"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DatasetError, match=r"transitions\.npz"):
        load_dataset(p, verify_checksums=False)


def test_wrong_schema_version(copy) -> None:
    p = copy()
    _edit_meta(p, schema_version=999)
    with pytest.raises(SchemaVersionError, match="999"):
        load_dataset(p)


def test_wrong_env_version(copy) -> None:
    p = copy()
    _edit_meta(p, env_version="v-old")
    with pytest.raises(EnvVersionError) as e:
        load_dataset(p)
    assert "'v-old'" in str(e.value) and repr(ENV_VERSION) in str(e.value)


@pytest.mark.parametrize("key", ["rewards", "behaviour_log_prob"])
def test_missing_key(copy, key: str) -> None:
    p = copy()
    _rewrite_npz(p, "transitions.npz", lambda a: a.pop(key))
    with pytest.raises(SchemaError, match=repr(key)):
        load_dataset(p)


def test_shape_and_dtype_mismatch(copy) -> None:
    p = copy()
    _rewrite_npz(p, "impressions.npz", lambda a: a.update(user_emb=a["user_emb"][:, :3]))
    with pytest.raises(SchemaError, match=r"'user_emb'.*shape"):
        load_dataset(p)
    p2 = copy("disc")
    _rewrite_npz(p2, "transitions.npz", lambda a: a.update(actions=a["actions"].astype(np.float32)))
    with pytest.raises(SchemaError, match=r"'actions'.*dtype"):
        load_dataset(p2)


def test_missing_meta_and_file(copy) -> None:
    p = copy()
    (p / "impressions.npz").unlink()
    with pytest.raises(DatasetError, match=r"impressions\.npz"):
        load_dataset(p)
    (p / META_FILE).unlink()
    with pytest.raises(DatasetError, match=r"meta\.json"):
        load_dataset(p)


@pytest.mark.parametrize(("edit", "pattern"), [
    (lambda m: m["dims"].update(M="abc"), r"'dims\.M' is 'abc', expected an integer >= 0"),
    (lambda m: m["dims"].update(D=-3), r"'dims\.D' is -3, expected an integer >= 0"),
    (lambda m: m["dims"].pop("E"), r"'dims' is missing 'E'"),
    (lambda m: m.update(dims=list(m["dims"].values())), r"'dims' is a list, expected an object"),
    (lambda m: m.update(files=list(m["files"])), r"'files' is a list, expected an object"),
    (lambda m: m["files"]["impressions.npz"].pop("sha256"), r"'files\.impressions\.npz'.*no sha256"),
    (lambda m: m.update(discrete="false"), r"'discrete' is 'false', expected a JSON boolean"),
    (lambda m: m.update(config=[]), r"'config' is a list, expected an object"),
    (lambda m: m.update(menu_names="abc"), r"'menu_names' is 'abc', expected a non-empty list"),
])
def test_malformed_meta_fields_name_the_field(copy, edit, pattern: str) -> None:
    """These used to raise a bare ValueError, KeyError or AttributeError, or read "false" as True."""
    p = copy()
    meta = json.loads((p / META_FILE).read_text())
    edit(meta)
    (p / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(SchemaError, match=pattern):
        load_dataset(p)


def _set(path: str, value) -> object:
    """An edit of meta that sets ``path`` ("a/b/0": keys and list indices) to ``value``."""
    def edit(m: dict) -> None:
        *head, last = [int(k) if k.isdigit() else k for k in path.split("/")]
        for k in head:
            m = m[k]
        m[last] = value
    return edit


def _drop(path: str) -> object:
    def edit(m: dict) -> None:
        *head, last = path.split("/")
        for k in head:
            m = m[k]
        del m[last]
    return edit


@pytest.mark.parametrize(("name", "edit", "pattern"), [
    # fields the loader used not to check at all
    ("cont", _set("env_id", "CartPole-v1"), r"'env_id' is 'CartPole-v1', expected 'feedgym/ForYouFeed-v0'"),
    ("disc", _set("env_id", "feedgym/ForYouFeed-v0"), r"'env_id' .* expected 'feedgym/ForYouFeedDiscrete-v0'"),
    ("cont", _drop("env_id"), r"'env_id' is missing"),
    ("cont", _set("preset", "small"), r"'preset' is 'small', but 'config\.preset' is 'tiny'"),
    ("cont", _set("format", "other"), r"'format' is 'other', expected 'feedgym\.offline_data'"),
    ("cont", _set("seed", "0"), r"'seed' is '0', expected an integer >= 0"),
    ("cont", _set("seed", -1), r"'seed' is -1, expected an integer >= 0"),
    ("cont", _set("config/horizon_days", -1), r"'config' is not a valid config: .*horizon_days=-1"),
    ("cont", _set("config/no_such_field", 1), r"'config' is not a valid config: .*no_such_field"),
    ("cont", _set("behaviour/sigma/0", float("inf")), r"'behaviour\.sigma\[0\]' is inf, expected a finite number > 0"),
    ("cont", _set("behaviour/sigma/3", -0.5), r"'behaviour\.sigma\[3\]' is -0\.5, expected a finite number > 0"),
    ("cont", _set("behaviour/mean/1", 1.5), r"'behaviour\.mean\[1\]' is 1\.5, expected a finite number in \[-1, 1\]"),
    ("cont", _set("behaviour/mean", [0.0]), r"'behaviour\.mean' has 1 entries, expected 13"),
    ("cont", _set("behaviour/discrete", True), r"'behaviour\.discrete' is True, but the dataset's 'discrete' is False"),
    ("cont", _set("behaviour/extra", 1), r"'behaviour' has unknown key 'extra'"),
    ("cont", _set("behaviour/kind", 5), r"'behaviour\.kind' is 5, expected a string"),
    ("disc", _set("behaviour/probs/1", float("nan")), r"'behaviour\.probs\[1\]' is nan, expected a finite number"),
    ("disc", _set("behaviour/probs/0", 0.9), r"'behaviour\.probs' sum to .*, expected 1"),
    ("disc", _set("behaviour/menu_size", 99), r"'behaviour\.menu_size' is 99, more than the 8 entries"),
    ("disc", _set("behaviour/epsilon", 2), r"'behaviour\.epsilon' is 2, expected a finite number in \[0, 1\]"),
    ("cont", _set("git/dirty", "yes"), r"'git\.dirty' is 'yes', expected a JSON boolean"),
    ("cont", _set("git/branch", "main"), r"'git' has unknown key 'branch'"),
    ("cont", _drop("collection/autoreset"), r"'collection' is missing 'autoreset'"),
    ("cont", _set("collection/worlds", 0), r"'collection\.worlds' is 0, expected an integer >= 1"),
    ("cont", _set("collection/world_users", [N_USERS + 1]), r"'collection\.world_users' sum to 6, expected n_users=5"),
    ("cont", _set("collection/world_seeds", [0, 1]), r"'collection\.world_seeds' has 2 entries, expected 1"),
    ("cont", _set("counts/transitions", 3), r"'counts\.transitions' is 3, but 'dims\.M' is 150"),
    ("cont", _set("counts/cookies", 3), r"'counts' has unknown key 'cookies'"),
    ("cont", _set("knob_names", ["a"] * 13), r"'knob_names' is .*distinct strings"),
    ("cont", _set("knob_names/0", "weight.p_other"), r"'knob_names' is .* but this code's knobs are"),
    ("cont", _set("observation_names", ["x"]), r"'observation_names' has 1 entries, expected \d+"),
    ("cont", _set("dims/Q", 1), r"'dims' has unknown key 'Q'"),
    ("cont", _set("dims/E", 3), r"'dims\.E' is 3, expected the config's corpus\.emb_dim"),
    ("cont", _set("files/extra.npz", {"sha256": "0" * 64, "bytes": 1}), r"'files' has unknown key 'extra\.npz'"),
    ("cont", _set("files/transitions.npz/bytes", "many"), r"'files\.transitions\.npz\.bytes' is 'many'"),
])
def test_meta_json_is_checked_as_a_whole(copy, name: str, edit, pattern: str) -> None:
    """Every meta.json field is checked, each failure a MetaError naming the field (these all loaded before)."""
    p = copy(name)
    meta = json.loads((p / META_FILE).read_text())
    edit(meta)
    (p / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(MetaError, match=pattern):
        load_dataset(p)


def test_meta_counts_must_match_the_tables(copy) -> None:
    p = copy()
    meta = json.loads((p / META_FILE).read_text())
    meta["counts"]["episodes"] += 1
    (p / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(MetaError, match=r"'counts\.episodes'.* is \d+, but the tables hold \d+"):
        load_dataset(p)


def test_meta_extra_keys_are_the_writers_notes(copy) -> None:
    """Top-level keys the format does not define (``collect(extra_meta=...)``) are kept as they are."""
    p = copy()
    _edit_meta(p, script={"name": "mine", "argv": ["--x"]}, note="logged for a test")
    ds = load_dataset(p)
    assert ds.meta["script"]["argv"] == ["--x"] and ds.meta["note"] == "logged for a test"


@pytest.mark.parametrize(("name", "value", "pattern"), [
    ("cont", np.inf, r"'behaviour_log_prob' .*has value inf .*must be finite"),
    ("cont", -np.inf, r"'behaviour_log_prob' .*has value -inf .*must be finite"),
    ("disc", np.inf, r"'behaviour_log_prob' .*has value inf .*must be finite"),
    ("disc", 0.5, r"'behaviour_log_prob' .*has value 0\.5 .*discrete action's log-probability must be <= 0"),
    ("cont", np.nan, r"'behaviour_log_prob' .*has value nan .*'gaussian_knobs' logs every action's log-probability"),
])
def test_propensities_must_be_finite(copy, tmp_path: Path, name: str, value: float, pattern: str) -> None:
    """A behaviour log-probability of +inf (an infinite importance weight) used to load."""
    p = copy(name)

    def poison(a: dict) -> None:
        a["behaviour_log_prob"] = a["behaviour_log_prob"].copy()
        a["behaviour_log_prob"][7] = value

    _rewrite_npz(p, "transitions.npz", poison)
    with pytest.raises(PropensityError, match=pattern):
        load_dataset(p)


def test_save_refuses_infinite_propensities(data_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset(data_dir / "cont")
    lp = ds.transitions.behaviour_log_prob.copy()
    lp[3] = np.inf
    with pytest.raises(PropensityError, match=r"behaviour_log_prob.*must be finite"):
        save_dataset(_with(ds, behaviour_log_prob=lp), tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_expected_config_checks_the_observation_layout(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Data logged with another observation layout (same config) is refused when a config is expected."""
    import envs.observation

    load_dataset(data_dir / "cont", expected_config=CFG)
    real = envs.observation.ObservationLayout

    class Wider(real):
        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            self.names = [*self.names, "user.new_field"]

    monkeypatch.setattr(envs.observation, "ObservationLayout", Wider)
    with pytest.raises(ConfigMismatchError, match=r"observation_names: .*user\.new_field"):
        load_dataset(data_dir / "cont", expected_config=CFG)


def test_meta_json_that_is_a_directory(copy) -> None:
    p = copy()
    (p / META_FILE).unlink()
    (p / META_FILE).mkdir()
    with pytest.raises(DatasetError, match=r"meta\.json is not a regular file"):
        load_dataset(p)


def test_mismatched_config(data_dir: Path) -> None:
    with pytest.raises(ConfigMismatchError, match="churn_days"):
        load_dataset(data_dir / "cont", expected_config=make_config("tiny"))
    with pytest.raises(ConfigMismatchError, match=r"preset 'tiny'.*expected.*'small'"):
        load_dataset(data_dir / "cont", expected_config=make_config("small"))
    with pytest.raises(ConfigMismatchError, match="discrete"):
        load_dataset(data_dir / "cont", expected_discrete=True)


# ---------------------------------------------------------------------------------------------- propensities
@pytest.mark.parametrize(("sigma", "mean"), [(0.3, 0.0), (1.5, 0.0), (np.linspace(0.1, 2.0, N_KNOBS), 0.0),
                                            (0.3, np.linspace(-0.9, 0.9, N_KNOBS)), (0.5, 1.0)])
def test_gaussian_log_density_matches_scipy(sigma, mean) -> None:
    pol = GaussianKnobs(sigma, mean)
    rng = np.random.default_rng(0)
    a, lp = pol.sample(np.zeros((50, 4), np.float32), rng)
    assert a.shape == (50, N_KNOBS) and a.dtype == np.float32 and np.all(np.abs(a) <= 1.0)
    s, m = pol.sigma, pol.mean
    ref = stats.truncnorm((-1.0 - m) / s, (1.0 - m) / s, loc=m, scale=s).logpdf(a.astype(np.float64)).sum(axis=1)
    np.testing.assert_allclose(lp, ref, rtol=1e-9, atol=1e-9)
    assert np.all(pol.log_prob(None, np.full((1, N_KNOBS), 1.5)) == -np.inf)


@pytest.mark.parametrize("mean", [0.0, 0.7])
def test_gaussian_samples_follow_truncated_normal(mean) -> None:
    pol = GaussianKnobs(0.6, mean)
    a, _ = pol.sample(np.zeros((3000, 1), np.float32), np.random.default_rng(1))
    ks = stats.kstest(a[:, 0], stats.truncnorm((-1 - mean) / 0.6, (1 - mean) / 0.6, loc=mean, scale=0.6).cdf)
    assert ks.pvalue > 1e-3


@pytest.mark.parametrize("mean", [1.5, np.nan])
def test_gaussian_mean_outside_the_box_is_refused(mean) -> None:
    with pytest.raises(ValueError, match="mean"):
        GaussianKnobs(0.3, mean)


def test_epsilon_preset_probabilities() -> None:
    pol = EpsilonMenu(0.4)
    p = pol.probs()
    assert p.size == len(MENU_NAMES)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(0.6 + 0.4 / len(MENU_NAMES))
    all_a = np.arange(len(MENU_NAMES))
    assert np.exp(pol.log_prob(None, all_a)).sum() == pytest.approx(1.0)
    a, lp = pol.sample(np.zeros((20000, 1), np.float32), np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(a, minlength=p.size) / a.size, p, atol=0.015)
    np.testing.assert_allclose(lp, np.log(p[a]))
    assert EpsilonMenu(0.0).log_prob(None, np.array([1]))[0] == -np.inf


@pytest.mark.parametrize("name", ["cont", "disc"])
def test_logged_log_probs_recompute(data_dir: Path, name: str) -> None:
    ds = load_dataset(data_dir / name)
    tr = ds.transitions
    pol = EpsilonMenu(0.5) if ds.discrete else GaussianKnobs(0.3)
    np.testing.assert_allclose(tr.behaviour_log_prob, pol.log_prob(tr.observations, tr.actions), rtol=1e-12)
    assert np.all(np.isfinite(tr.behaviour_log_prob))


def test_callable_policy_log_probs() -> None:
    from agents.policies import WeightedSum

    obs = np.zeros((4, 7), np.float32)
    rng = np.random.default_rng(0)
    a, lp = CallablePolicy(WeightedSum()).sample(obs, rng)
    assert a.shape == (4, N_KNOBS) and np.all(np.isnan(lp))
    a, lp = CallablePolicy(lambda o: (np.zeros((len(o), N_KNOBS)), np.full(len(o), -1.0))).sample(obs, rng)
    np.testing.assert_array_equal(lp, -1.0)

    class WithLogProb:
        def __call__(self, o):
            return np.full(len(o), 2)

        def log_prob(self, o, a):
            return np.log(np.full(len(o), 0.25))

    a, lp = CallablePolicy(WithLogProb(), discrete=True).sample(obs, rng)
    assert a.dtype == np.int64 and np.allclose(lp, np.log(0.25))
    with pytest.raises(ValueError, match="shape"):
        CallablePolicy(lambda o: np.zeros((len(o), 3))).sample(obs, rng)
    ds = collect(CallablePolicy(WeightedSum()), CFG, n_users=2, n_steps=3, seed=0)
    assert np.all(np.isnan(ds.transitions.behaviour_log_prob)) and ds.meta["behaviour"]["kind"] == "callable"


# ---------------------------------------------------------------------------------------------- collection
def test_collection_is_deterministic() -> None:
    kw = dict(n_users=3, n_steps=15, seed=7)
    a, b = (collect(EpsilonMenu(0.5), CFG, **kw) for _ in range(2))
    c = collect(EpsilonMenu(0.5), CFG, **{**kw, "seed": 8})
    for table in ("transitions", "impressions"):
        schema = TRANSITION_SCHEMA if table == "transitions" else IMPRESSION_SCHEMA
        for k in schema:
            np.testing.assert_array_equal(getattr(getattr(a, table), k), getattr(getattr(b, table), k), err_msg=k)
    assert not np.array_equal(a.transitions.observations, c.transitions.observations)


def test_collect_refuses_a_menu_larger_than_the_envs() -> None:
    with pytest.raises(ValueError, match=rf"menu_size=20 is invalid.*has {MENU_SIZE} entries"):
        collect(EpsilonMenu(0.9, menu_size=20), "tiny", n_users=2, n_steps=2)


@pytest.mark.parametrize(("value", "pattern"), [
    (-1, rf"discrete action -1 \(slot 0\): expected a menu index in \[0, {MENU_SIZE}\)"),
    (MENU_SIZE, rf"discrete action {MENU_SIZE} \(slot 0\)"),
    (2.7, r"discrete action 2\.7 .*expected an integer menu index"),
    (np.nan, r"discrete action nan "),
])
def test_collect_refuses_bad_discrete_actions(value, pattern: str) -> None:
    """-1 used to be logged while the simulator served the last preset; 2.7 was logged and served as 2."""
    pol = CallablePolicy(lambda o: np.full(len(o), value), discrete=True, name="bad")
    with pytest.raises(ValueError, match=r"policy 'bad' returned " + pattern):
        collect(pol, CFG, n_users=2, n_steps=2)
    ok = collect(CallablePolicy(lambda o: np.full(len(o), 2.0), discrete=True), CFG, n_users=2, n_steps=2)
    np.testing.assert_array_equal(ok.transitions.actions, 2)


def test_collect_refuses_non_finite_knobs() -> None:
    pol = CallablePolicy(lambda o: np.full((len(o), N_KNOBS), np.nan), name="nan")
    with pytest.raises(ValueError, match=r"'nan' returned knob value nan \(slot 0, knob .*finite and in \[-1, 1\]"):
        collect(pol, CFG, n_users=2, n_steps=2)


def test_one_episode_per_user_mode() -> None:
    ds = collect(GaussianKnobs(0.3), CFG, n_users=4, n_steps=None, autoreset=False, seed=1)
    tr = ds.transitions
    assert ds.meta["counts"]["episodes"] == 4 == np.unique(tr.user_id).size
    assert tr.cutoffs.sum() == 0 and (tr.terminals | tr.timeouts).sum() == 4
    capped = collect(GaussianKnobs(0.3), CFG, n_users=4, n_steps=2, autoreset=False, seed=1).transitions
    ends = capped.cutoffs.astype(int) + capped.terminals + capped.timeouts
    _, last = capped.episode_bounds()
    assert np.unique(capped.episode_id).size == 4 and (capped.step < 2).all()
    np.testing.assert_array_equal(ends[last - 1], 1)  # every episode ends once: cut off at the cap or over
    assert ends.sum() == 4 and capped.cutoffs.sum() >= 1


def test_split_by_user(data_dir: Path) -> None:
    ds = load_dataset(data_dir / "cont")
    tr_ds, va_ds = split_by_user(ds, 0.3, seed=0)
    assert not set(tr_ds.transitions.user_id) & set(va_ds.transitions.user_id)
    assert len(tr_ds.transitions) + len(va_ds.transitions) == len(ds.transitions)
    assert len(tr_ds.impressions) + len(va_ds.impressions) == len(ds.impressions)
    for part in (tr_ds, va_ds):
        np.testing.assert_array_equal(part.impressions.episode_id, part.transitions.episode_id[
            part.impressions.transition_index])


# ---------------------------------------------------------------------------------------------- d3rlpy / Minari
@pytest.mark.parametrize("name", ["cont", "disc"])
def test_to_mdp_dataset(data_dir: Path, name: str) -> None:
    import d3rlpy

    ds = load_dataset(data_dir / name)
    tr = ds.transitions
    n_eps = ds.meta["counts"]["episodes"]
    mdp = to_mdp_dataset(ds)
    assert len(mdp.episodes) == n_eps
    assert sum(e.transition_count for e in mdp.episodes) == len(tr)  # nothing lost at timeouts
    assert sum(bool(e.terminated) for e in mdp.episodes) == int(tr.terminals.sum())
    starts, ends = tr.episode_bounds()
    for e, s, t in zip(mdp.episodes, starts, ends):
        np.testing.assert_array_equal(e.observations[: t - s], tr.observations[s:t])
        np.testing.assert_array_equal(e.rewards[: t - s, 0], tr.rewards[s:t])
        if not e.terminated:  # the appended row is the true final observation
            np.testing.assert_array_equal(e.observations[-1], tr.next_observations[t - 1])
    # the picked transition's next observation is the logged one
    picker = d3rlpy.dataset.BasicTransitionPicker()
    e0, s0, t0 = next((e, s, t) for e, s, t in zip(mdp.episodes, starts, ends) if not e.terminated)
    last = picker(e0, int(t0 - s0 - 1))
    np.testing.assert_array_equal(last.next_observation, tr.next_observations[t0 - 1])
    raw = to_mdp_dataset(ds, keep_last_timeout_transition=False)
    n_trunc = int((tr.timeouts | tr.cutoffs).sum())
    assert sum(e.transition_count for e in raw.episodes) == len(tr) - n_trunc
    if ds.discrete:
        assert mdp.dataset_info.action_size == len(MENU_NAMES)
        assert isinstance(mdp.dataset_info.action_size, int)


def test_to_mdp_dataset_of_an_empty_selection(data_dir: Path) -> None:
    """d3rlpy used to fail with a bare AssertionError ("No episode termination was found")."""
    empty = select_episodes(load_dataset(data_dir / "cont"), np.array([], np.int64))
    with pytest.raises(DatasetError, match=r"no transitions"):
        to_mdp_dataset(empty)


@pytest.mark.parametrize("name", ["cont", "disc"])
def test_minari_round_trip_alignment(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     name: str) -> None:
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    import warnings

    from offline_data import minari_to_arrays, minari_to_mdp_dataset, to_minari

    ds = load_dataset(data_dir / name)
    tr = ds.transitions
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_minari(ds, f"feedgym/test-{name}-v0")
    assert (tmp_path / "minari").exists()
    back = minari_to_arrays(f"feedgym/test-{name}-v0")
    np.testing.assert_array_equal(back["observations"], tr.observations)
    np.testing.assert_array_equal(back["next_observations"], tr.next_observations)
    np.testing.assert_array_equal(back["actions"], tr.actions)
    np.testing.assert_allclose(back["rewards"], tr.rewards)
    np.testing.assert_array_equal(back["terminals"], tr.terminals)
    np.testing.assert_array_equal(back["truncations"], tr.timeouts | tr.cutoffs)
    np.testing.assert_array_equal(back["episode_ends"], tr.episode_bounds()[1])
    mdp, ref = minari_to_mdp_dataset(f"feedgym/test-{name}-v0"), to_mdp_dataset(ds)
    assert len(mdp.episodes) == len(ref.episodes)
    for a, b in zip(mdp.episodes, ref.episodes):
        np.testing.assert_array_equal(a.observations, b.observations)


# ---------------------------------------------------------------------------------------------- script
def test_collect_script_main(tmp_path: Path) -> None:
    mod = load_script("collect")
    args = mod.Args(preset="tiny", behaviour="epsilon_menu", users=2, steps=3, root=tmp_path, progress=False)
    ds = mod.main(args)
    out = tmp_path / "tiny-epsilon_menu-s0"
    loaded = load_dataset(out, expected_config=make_config("tiny"), expected_discrete=True)
    assert len(loaded.transitions) == len(ds.transitions) == 6
    assert loaded.meta["script"]["args"]["users"] == "2"
    with pytest.raises(FileExistsError):
        mod.main(args)


def test_collect_script_checks_name_and_target_before_collecting(data_dir: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing name used to fail only at save time, after the whole collection; ``--name ../escaped``
    wrote outside ``--root`` and ``--name ""`` fell back to the default name."""
    mod = load_script("collect")
    monkeypatch.setattr(mod, "collect", lambda *a, **k: pytest.fail("collected although the input is bad"))
    root = tmp_path / "root"
    shutil.copytree(data_dir / "disc", root / "tiny-epsilon_menu-s0")
    args = mod.Args(preset="tiny", behaviour="epsilon_menu", users=2, steps=3, root=root, progress=False)
    with pytest.raises(FileExistsError, match=r"tiny-epsilon_menu-s0 already holds a dataset: pass --overwrite"):
        mod.main(args)
    for name in ("../escaped", "", ".", "a/b"):
        with pytest.raises(ValueError, match=rf"--name {name!r} is invalid: it must be one directory name inside "
                                             r"--root"):
            mod.main(dataclasses.replace(args, name=name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]
    assert sorted(p.name for p in root.iterdir()) == ["tiny-epsilon_menu-s0"]


def _fake_cem(action: np.ndarray, budget: int):
    """A CEM result of one iteration that spent ``budget``: its mean is ``action``."""
    from agents.cem import CEMResult

    return CEMResult(action, budget, means=[action], iter_steps=budget)


def test_main_sets_aside_a_cem_vector_tuned_on_another_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """``_cem`` used to overwrite cem.json when the seed, config or budget differed ("tuning again")."""

    from agents.sinks import NoopSink

    main = load_script("main")
    tuned = []

    def fake_tune(cfg, budget, seed, **kw):
        tuned.append(seed)
        return _fake_cem(np.full(N_KNOBS, seed / 100, np.float32), budget)

    monkeypatch.setattr(main, "cem_tune", fake_tune)
    cfg = make_config("tiny")
    args = main.Args(preset="tiny", timesteps=1024, train_worlds=1, out=tmp_path, train_seed=12)
    main._cem(args, cfg, NoopSink())
    first = (tmp_path / "cem.json").read_bytes()
    monkeypatch.setattr(main, "cem_tune", lambda *a, **k: pytest.fail("tuning interrupted"))
    with pytest.raises(pytest.fail.Exception):  # tuning that does not finish leaves the old vector in place
        main._cem(dataclasses.replace(args, train_seed=7), cfg, NoopSink())
    assert (tmp_path / "cem.json").read_bytes() == first and not list(tmp_path.glob("*.stale-*"))
    monkeypatch.setattr(main, "cem_tune", fake_tune)
    capsys.readouterr()
    np.testing.assert_allclose(main._cem(dataclasses.replace(args, train_seed=7), cfg, NoopSink())[0], 0.07)
    out = capsys.readouterr().out
    assert "tuned on another config, budget, seed or code" in out and f"moved to {tmp_path / 'cem.json.stale-0'}" in out
    assert (tmp_path / "cem.json.stale-0").read_bytes() == first
    assert json.loads((tmp_path / "cem.json").read_text())["seed"] == 7 and tuned == [12, 7]
    np.testing.assert_allclose(main._cem(dataclasses.replace(args, train_seed=7), cfg, NoopSink())[0], 0.07)  # reused
    assert tuned == [12, 7]


def test_main_passes_cem_steps_per_iter_and_keys_the_vector_on_it(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``--cem-steps-per-iter`` reaches ``cem_tune``; a vector tuned with another split is not reused, and the
    key records the split whatever it is."""

    from agents.sinks import NoopSink

    main = load_script("main")
    calls: list[int] = []

    def fake_tune(cfg, budget, seed, steps_per_iter, **kw):
        calls.append(steps_per_iter)
        return _fake_cem(np.full(N_KNOBS, steps_per_iter / 1000, np.float32), budget)

    monkeypatch.setattr(main, "cem_tune", fake_tune)
    cfg = make_config("tiny")
    args = main.Args(preset="tiny", timesteps=1024, train_worlds=1, out=tmp_path)
    main._cem(args, cfg, NoopSink())
    assert json.loads((tmp_path / "cem.json").read_text())["steps_per_iter"] == 100
    np.testing.assert_allclose(main._cem(dataclasses.replace(args, cem_steps_per_iter=50), cfg, NoopSink())[0], 0.05)
    assert json.loads((tmp_path / "cem.json").read_text())["steps_per_iter"] == 50
    main._cem(dataclasses.replace(args, cem_steps_per_iter=50), cfg, NoopSink())  # reused
    np.testing.assert_allclose(main._cem(args, cfg, NoopSink())[0], 0.1)  # the 50-split vector is not the default's
    assert calls == [100, 50, 100]
    with pytest.raises(ValueError, match="cem_steps_per_iter=0"):
        main.main(dataclasses.replace(args, cem_steps_per_iter=0))


def test_main_sets_aside_a_dataset_it_does_not_reuse(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The main job's dataset (``agents.main_job.logged_dataset``) is set aside, never overwritten, when it was
    logged by another policy, with another training seed, by other code, or does not load."""
    from agents.main_job import logged_dataset

    main = load_script("main")
    cfg = make_config("tiny")
    args = main.Args(preset="tiny", out=tmp_path, dataset_users=3, dataset_steps=4, train_worlds=1, train_seed=0)
    first = logged_dataset(args, cfg)
    before = _files(tmp_path / "dataset")
    capsys.readouterr()
    second = logged_dataset(dataclasses.replace(args, behaviour_sigma=0.5), cfg)
    out = capsys.readouterr().out
    assert "logged by another policy" in out and f"moved to {tmp_path / 'dataset.stale-0'}" in out
    assert _files(tmp_path / "dataset.stale-0") == before
    kept = load_dataset(tmp_path / "dataset.stale-0", expected_config=cfg)
    assert kept.meta["behaviour"] == first.meta["behaviour"] != second.meta["behaviour"]
    assert load_dataset(tmp_path / "dataset").meta["behaviour"]["sigma"][0] == 0.5
    f = tmp_path / "dataset" / "transitions.npz"  # a corrupt dataset is kept too, for inspection
    f.write_bytes(f.read_bytes()[:100])
    corrupt = _files(tmp_path / "dataset")
    logged_dataset(dataclasses.replace(args, behaviour_sigma=0.5), cfg)
    assert "not reusable" in capsys.readouterr().out
    assert _files(tmp_path / "dataset.stale-1") == corrupt
    load_dataset(tmp_path / "dataset", expected_config=cfg)
    capsys.readouterr()
    logged_dataset(dataclasses.replace(args, behaviour_sigma=0.5, train_seed=1), cfg)
    assert "logged with another training seed" in capsys.readouterr().out
    assert (tmp_path / "dataset.stale-2").is_dir()
    import agents.main_job as main_job

    monkeypatch.setattr(main_job, "code_digest", lambda packages: "other code")
    logged_dataset(dataclasses.replace(args, behaviour_sigma=0.5, train_seed=1), cfg)
    assert "logged by other code" in capsys.readouterr().out and (tmp_path / "dataset.stale-3").is_dir()
