"""Logged datasets: collection, propensities, on-disk format and its checks, d3rlpy and Minari."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from envs.config import ENV_VERSION, make_config
from envs.feed_env import PRESET_MATRIX, PRESET_NAMES
from offline_data import (
    CallablePolicy,
    ChecksumError,
    ConfigMismatchError,
    DatasetError,
    EnvVersionError,
    EpsilonPreset,
    GaussianKnobs,
    SchemaError,
    SchemaVersionError,
    collect,
    load_dataset,
    split_by_user,
    to_mdp_dataset,
)
from offline_data.dataset import IMPRESSION_SCHEMA, META_FILE, TRANSITION_SCHEMA, sha256_file
from rankers.config import N_KNOBS

# Short episodes with both churn (terminal) and the max_steps cap (timeout) inside a small budget.
CFG = make_config("tiny", churn_days=1.5, max_steps=8, users={"patience_videos": 8.0})
N_USERS, N_STEPS = 5, 30


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    collect(GaussianKnobs(0.3), CFG, n_users=N_USERS, n_steps=N_STEPS, seed=0, out=root / "cont")
    collect(EpsilonPreset(0.5), CFG, n_users=N_USERS, n_steps=N_STEPS, seed=0, out=root / "disc")
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
    meta["files"][name]["sha256"] = sha256_file(path / name)  # a consistent file, so the schema check runs
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
        np.testing.assert_array_equal(tr.knob_actions, PRESET_MATRIX[tr.actions])
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
    pol = EpsilonPreset(0.4)
    p = pol.probs()
    assert p.size == len(PRESET_NAMES)
    assert p.sum() == pytest.approx(1.0)
    assert p[0] == pytest.approx(0.6 + 0.4 / len(PRESET_NAMES))
    all_a = np.arange(len(PRESET_NAMES))
    assert np.exp(pol.log_prob(None, all_a)).sum() == pytest.approx(1.0)
    a, lp = pol.sample(np.zeros((20000, 1), np.float32), np.random.default_rng(0))
    np.testing.assert_allclose(np.bincount(a, minlength=p.size) / a.size, p, atol=0.015)
    np.testing.assert_allclose(lp, np.log(p[a]))
    assert EpsilonPreset(0.0).log_prob(None, np.array([1]))[0] == -np.inf


@pytest.mark.parametrize("name", ["cont", "disc"])
def test_logged_log_probs_recompute(data_dir: Path, name: str) -> None:
    ds = load_dataset(data_dir / name)
    tr = ds.transitions
    pol = EpsilonPreset(0.5) if ds.discrete else GaussianKnobs(0.3)
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
    a, b = (collect(EpsilonPreset(0.5), CFG, **kw) for _ in range(2))
    c = collect(EpsilonPreset(0.5), CFG, **{**kw, "seed": 8})
    for table in ("transitions", "impressions"):
        schema = TRANSITION_SCHEMA if table == "transitions" else IMPRESSION_SCHEMA
        for k in schema:
            np.testing.assert_array_equal(getattr(getattr(a, table), k), getattr(getattr(b, table), k), err_msg=k)
    assert not np.array_equal(a.transitions.observations, c.transitions.observations)


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
        assert mdp.dataset_info.action_size == len(PRESET_NAMES)
        assert isinstance(mdp.dataset_info.action_size, int)


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
    spec = importlib.util.spec_from_file_location("collect_script", Path(__file__).parent.parent / "scripts/collect.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["collect_script"] = mod
    spec.loader.exec_module(mod)
    args = mod.Args(preset="tiny", behaviour="epsilon_preset", users=2, steps=3, root=tmp_path, progress=False)
    ds = mod.main(args)
    out = tmp_path / "tiny-epsilon_preset-s0"
    loaded = load_dataset(out, expected_config=make_config("tiny"), expected_discrete=True)
    assert len(loaded.transitions) == len(ds.transitions) == 6
    assert loaded.meta["script"]["args"]["users"] == "2"
    with pytest.raises(FileExistsError):
        mod.main(args)
