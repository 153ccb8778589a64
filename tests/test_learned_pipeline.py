"""The learned pipeline in the env (issue 4, point 4): two-tower retrieval, learned pre-ranker and ranker,
wired by config, with checkpoints resolved from a versioned cache that is built on first use.

Every test here uses a temporary cache root (``FEEDGYM_CACHE``) holding one small entry for ``tiny``
(12 users x 20 steps, one epoch: the wiring is under test, not the models' quality)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import envs.learned as el
import offline_data.provision as prov
import rankers.model_files as model_files
from envs import ENV_ID
from envs.config import make_config
from envs.feed_env import FeedEnv
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS, PipelineConfig
from rankers.item_index import EmbeddingIndex
from rankers.model_files import RankerCheckpointError
from rankers.serving import LearnedPreRanker, LearnedScorer, TwoTowerIndex
from rankers.sourcing import SRC_INTEREST
from tests import test_pipeline_invariants as inv
from tests.test_imports import ROOT, imported_modules

BUDGET = prov.RankerTraining(users=12, steps=20, epochs=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """A cache root with the tiny entry built, set as ``FEEDGYM_CACHE`` for the module."""
    root = tmp_path_factory.mktemp("feedgym_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(prov.CACHE_ENV, str(root))
        prov.ensure_rankers(el.learned_pipeline(make_config("tiny")), progress=False, training=BUDGET)
        yield root


@pytest.fixture(scope="module")
def learned(cache):
    return el.learned_pipeline(make_config("tiny"))


def test_config_switches_are_validated_and_the_learned_pipeline_is_the_default_of_small_and_default() -> None:
    p = PipelineConfig()
    assert (p.retrieval, p.preranker, p.scorer) == ("content", "heuristic", "noisy_oracle")
    assert p.learned_models == ()
    for name in ("small", "default", "small-shift", "default-shift"):
        assert make_config(name).pipeline.learned_models == ("two_tower", "preranker", "ranker"), name
    for name in ("tiny", "large"):
        assert make_config(name).pipeline.learned_models == (), f"{name}: the noisy-oracle pipeline"
    assert el.noisy_oracle_pipeline(make_config("small")).pipeline.learned_models == ()
    assert el.noisy_oracle_pipeline(make_config("small")).pipeline.n_prerank == make_config("small").pipeline.n_prerank
    assert el.with_pipeline(make_config("small"), "preset") == make_config("small")
    assert el.with_pipeline(make_config("tiny"), "learned") == el.learned_pipeline(make_config("tiny"))
    with pytest.raises(ValueError, match="pipeline='oracle' is invalid"):
        el.with_pipeline(make_config("tiny"), "oracle")
    for field, bad in (("retrieval", "bm25"), ("preranker", "gbdt"), ("scorer", "oracle")):
        with pytest.raises(ValueError, match=rf"PipelineConfig.{field}='{bad}' is invalid"):
            PipelineConfig(**{field: bad})
    assert PipelineConfig(retrieval="two_tower", scorer="learned").learned_models == ("two_tower", "ranker")


def test_learned_pipeline_steps_and_holds_the_invariants(learned) -> None:
    sim = FeedSimulator(learned, 4, seed=1)
    pipe = sim.pipeline
    assert isinstance(pipe.index, TwoTowerIndex) and pipe.index.kind == "flat"
    assert isinstance(pipe.prerank, LearnedPreRanker)
    assert isinstance(pipe.scorer, LearnedScorer)

    recs = inv.run_with_spy(learned, n_users=10, n_steps=40)
    inv.test_feed_items_unique_and_valid(recs, learned)
    inv.test_slate_items_unique_and_valid(recs, learned)
    inv.test_nothing_shown_twice_in_a_session(recs)
    inv.assert_rules_hold(recs, learned.pipeline)
    inv.test_zero_action_is_weighted_sum_ranking(learned, rebalancing=True)
    # the interest source serves two-tower neighbours; the pool's heads are the learned ranker's
    assert any((r["pool"]["item"] >= 0).any() for r in recs)
    sim.reset()
    for _ in range(3):
        res = sim.step(np.zeros((4, N_KNOBS), np.float32))
    assert np.isfinite(res.obs).all()
    assert (sim.pipeline.pool.source == SRC_INTEREST).any()
    heads, _ = pipe.scorer.score(np.arange(4), np.maximum(pipe.pool.item, 0), sim.view, sim.corpus.catalog)
    valid = pipe.pool.item >= 0
    np.testing.assert_allclose(pipe.pool.heads[valid], heads[valid], rtol=0, atol=0.35)  # same model, later state


def test_pre_ranker_serving_from_cached_item_sides_equals_the_model(learned) -> None:
    """Serving scores each candidate with one inner product against the item side kept per catalog slot;
    right after the item sides are made, that is the model's own forward pass on the same features."""
    from rankers.models import build_features, known_ids_of, raw_from_serving

    sim = FeedSimulator(learned, 5, seed=3)
    sim.reset()
    for _ in range(4):
        sim.step(np.zeros((5, N_KNOBS), np.float32))  # session context: engaged / skipped topics, rates
    pre = sim.pipeline.prerank
    cat = sim.corpus.catalog
    pre.items = None  # item sides made now, from today's catalog
    rng = np.random.default_rng(0)
    items = rng.integers(0, cat.n_items, (5, 40)).astype(np.int32)
    items[:, -3:] = -1
    users = np.arange(5)
    got = pre.score(users, items, sim.view, cat)
    with torch.no_grad():
        want = pre.model(build_features(raw_from_serving(users, items, sim.view, cat), pre.model.cfg,
                                        known_ids_of(pre.model))).numpy()
    assert np.all(np.isneginf(got[:, -3:]))
    np.testing.assert_allclose(got[:, :-3], want[:, :-3], rtol=1e-5, atol=1e-5)
    assert pre.items is not None and pre.items.vecs.shape[1] == pre.model.side_dim


@pytest.mark.parametrize("block", [1, 7, 40, 10**9])
def test_scoring_in_blocks_of_users_gives_the_bits_of_one_pass(learned, block: int,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages 2-3 score candidates in blocks of users (rankers.types.ROW_BLOCK) to keep their
    intermediates small; every head, uncertainty and logit must be bit for bit what one pass over all
    users gives (the user-side products once for all users, the activations over one tensor), or
    trajectories would depend on the block size."""
    import rankers.types as rt
    from rankers.models import MultiTaskRanker, build_features, ensemble_mean, raw_from_serving

    sim = FeedSimulator(learned, 9, seed=5)
    sim.reset()
    for _ in range(3):
        sim.step(np.zeros((9, N_KNOBS), np.float32))
    pipe, cat = sim.pipeline, sim.corpus.catalog
    rng = np.random.default_rng(1)
    items = rng.integers(0, cat.n_items, (9, 40)).astype(np.int32)
    items[:, -2:] = -1
    users = np.arange(9)
    monkeypatch.setattr(rt, "ROW_BLOCK", block)  # rows per block; 1 = one user per block
    heads, unc = pipe.scorer.score(users, items, sim.view, cat)
    logit = pipe.prerank.score(users, items, sim.view, cat)
    with torch.no_grad():  # the one-pass reference: the model's plain forward over all users
        model = pipe.scorer.model
        act = MultiTaskRanker.activate(model(build_features(raw_from_serving(users, items, sim.view, cat), model.cfg,
                                                            pipe.scorer._known)))
    want_heads = np.where((items >= 0)[..., None], ensemble_mean(act).numpy(), 0.0).astype(np.float32)
    assert heads.dtype == np.float32 and np.array_equal(heads, want_heads)
    monkeypatch.setattr(rt, "ROW_BLOCK", 10**9)
    heads1, unc1 = pipe.scorer.score(users, items, sim.view, cat)
    assert np.array_equal(heads, heads1) and np.array_equal(unc, unc1)
    assert np.array_equal(logit, pipe.prerank.score(users, items, sim.view, cat))


def test_baselines_are_served_by_the_same_models_and_true_scores_by_the_truth(learned) -> None:
    """Baselines change only the serving policy: no baseline's world trains other rankers, and true_scores'
    stage 3 is the world's truth even where the preset's ranker is learned."""
    from agents.policies import make_baseline
    from rankers.ranking import NoisyOracleScorer

    for name in ("weighted_sum", "engagement", "random", "true_scores"):
        pol = make_baseline(name)
        cfg = learned.replace(**pol.env_overrides) if pol.env_overrides else learned
        assert prov.cache_key(cfg) == prov.cache_key(learned), name
    oracle_cfg = learned.replace(**make_baseline("true_scores").env_overrides)
    sim = FeedSimulator(oracle_cfg, 2, seed=0)
    assert isinstance(sim.pipeline.scorer, NoisyOracleScorer)
    assert oracle_cfg.pipeline.scorer_noise == 0.0 and oracle_cfg.pipeline.scorer_cold_noise == 0.0
    assert isinstance(sim.pipeline.index, TwoTowerIndex)  # stages 1-2 stay the world's learned ones


def test_same_seed_same_rollout(learned) -> None:
    def rollout(seed: int) -> np.ndarray:
        sim = FeedSimulator(learned, 3, seed=seed)
        sim.reset()
        items = [sim.step(np.zeros((3, N_KNOBS), np.float32)).info["slate"].item for _ in range(15)]
        return np.stack(items)

    a, b = rollout(5), rollout(5)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, rollout(6))


def test_ivf_index_over_two_tower_vectors(learned) -> None:
    cfg = learned.replace(pipeline={"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 16})
    sim = FeedSimulator(cfg, 6, seed=2)
    sim.reset()
    index = sim.pipeline.index
    assert isinstance(index, TwoTowerIndex) and index.kind == "ivf"
    exact = TwoTowerIndex(index.model, sim.corpus.catalog, "flat")
    q = index.query(np.arange(6), sim.view)
    assert q.shape == (6, index.dim)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-5)
    got, want = index.search(q, 50), exact.search(q, 50)
    overlap = np.mean([np.isin(w, g).mean() for g, w in zip(got, want, strict=True)])
    assert overlap > 0.999  # nprobe = nlist: the IVF search is exhaustive
    n0, made0 = sim.corpus.catalog.n_items, index.n_item_vectors
    for _ in range(20):  # uploads and a day boundary (1/15 day a step): the index follows the catalog
        sim.step(np.zeros((6, N_KNOBS), np.float32))
    cat = sim.corpus.catalog
    assert cat.n_items > n0 and index.n_item_vectors >= made0 + n0  # a full refresh happened
    index.sync(cat)  # the uploads of the last tick are indexed at the next stage-1 run
    assert index.index.ntotal == cat.n_items == index.n_indexed
    index.items._epoch = -1  # force the next refresh: then every vector is the item tower's on today's catalog
    index.sync(cat)
    fresh = TwoTowerIndex(index.model, cat, "flat")
    np.testing.assert_allclose(index.vecs[: cat.n_items], fresh.vecs[: cat.n_items], atol=1e-5)
    assert index.index.ntotal == cat.n_items


def test_second_construction_reuses_the_cache(cache, learned, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = cache / prov.cache_key(learned)
    files = sorted(entry.iterdir())
    assert [f.name for f in files] == ["manifest.json", "preranker.pt", "ranker.pt", "two_tower.pt"]
    mtimes = [f.stat().st_mtime_ns for f in files]
    calls: list[int] = []

    def no_training(*a, **k):
        calls.append(1)
        raise AssertionError("the cache entry should have been reused")

    monkeypatch.setattr(prov, "build_entry", no_training)
    monkeypatch.setattr(prov, "_LOADED", {})  # not even the loaded models: load from disk
    monkeypatch.setattr(el, "_PROVIDED", {})  # nor those served: as a new process
    env = gym.make(ENV_ID, config=learned)  # the registered entry point provisions the models
    env.reset(seed=0)
    env.step(env.action_space.sample())
    FeedSimulator(learned, 2, seed=0)  # served the models gym.make provisioned
    assert calls == []
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]
    # the fields that only pick or serve the models, and the reward, share the entry; the world does not
    assert prov.cache_key(make_config("tiny")) == prov.cache_key(learned)
    assert prov.cache_key(learned.replace(reward={"mode": "engagement"})) == prov.cache_key(learned)
    assert prov.cache_key(learned.replace(users={"w_hook": 2.0})) != prov.cache_key(learned)
    assert prov.cache_key(learned.replace(pipeline={"n_rank": 60})) != prov.cache_key(learned)
    ablation = {"explore_share": 0.0, "diversity_rules": False, "score_mode": "engagement",
                "ranking_weights": (0.1,) * 8}
    assert prov.cache_key(learned.replace(pipeline=ablation)) == prov.cache_key(learned)  # same models for every arm


def test_an_env_never_builds_models_it_was_not_given(cache, learned, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Provisioning happens where the user asks for it: a simulator or env class whose config serves learned
    models it was not given says how to provide them and builds nothing; given models are served."""
    models = prov.learned_models(learned, progress=False)
    monkeypatch.setenv(prov.CACHE_ENV, str(tmp_path / "empty"))
    monkeypatch.setattr(el, "_PROVIDED", {})
    with pytest.raises(el.MissingModelsError, match=r"offline_data\.provision\.ensure_rankers"):
        FeedSimulator(learned, 2, seed=0)
    with pytest.raises(el.MissingModelsError, match=r"gym\.make"):
        FeedEnv(config=learned).reset(seed=0)
    assert not (tmp_path / "empty").exists()
    FeedSimulator(make_config("tiny"), 2, seed=0)  # the noisy oracle needs none
    sim = FeedSimulator(learned, 2, seed=0, models=models)
    assert isinstance(sim.pipeline.scorer, LearnedScorer) and sim.pipeline.scorer.model is models["ranker"]


def test_cache_key_follows_the_code_that_builds_an_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    digest = prov.code_digest.__wrapped__  # uncached: the tree below changes between calls
    for pkg in prov.CODE_PACKAGES:
        (tmp_path / pkg).mkdir()
        (tmp_path / pkg / "a.py").write_text("x = 1\n")
    (tmp_path / "agents").mkdir()
    (tmp_path / "agents" / "b.py").write_text("y = 1\n")
    before = digest(tmp_path)
    (tmp_path / "agents" / "b.py").write_text("y = 2\n")  # not a builder of entries
    (tmp_path / "envs" / "notes.md").write_text("not code\n")
    assert digest(tmp_path) == before
    (tmp_path / "rankers" / "a.py").write_text("x = 2\n")
    changed = digest(tmp_path)
    assert changed != before
    (tmp_path / "rankers" / "a.py").write_text("x = 1\n")
    assert digest(tmp_path) == before
    (tmp_path / "offline_data" / "sub").mkdir()
    (tmp_path / "offline_data" / "sub" / "c.py").write_text("")  # a new module, nested
    assert digest(tmp_path) not in (before, changed)
    # this checkout's digest enters the key: an entry built by other code is not found
    cfg = el.learned_pipeline(make_config("tiny"))
    key = prov.cache_key(cfg)
    assert prov.cache_fields(cfg)["code"] == prov.code_digest()
    monkeypatch.setattr(prov, "code_digest", lambda: "0" * 16)
    assert prov.cache_key(cfg) != key


def test_entry_of_another_preset_is_refused(cache, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = el.learned_pipeline(make_config("tiny"))
    shifted = el.learned_pipeline(make_config("tiny-shift"))
    assert prov.cache_key(shifted) != prov.cache_key(tiny)
    shutil.copytree(cache / prov.cache_key(tiny), tmp_path / prov.cache_key(shifted))  # a misplaced entry
    with pytest.raises(RankerCheckpointError, match=r"preset is 'tiny', expected 'tiny-shift'.*delete it"):
        prov.ensure_rankers(shifted, progress=False, cache_dir=tmp_path)
    monkeypatch.setenv(prov.CACHE_ENV, str(tmp_path))
    with pytest.raises(RankerCheckpointError, match="preset is 'tiny', expected 'tiny-shift'"):
        prov.learned_models(shifted, progress=False)
    # a checkpoint of another feature schema is refused by the same check
    entry = tmp_path / "v-old"
    shutil.copytree(cache / prov.cache_key(tiny), entry)
    blob = torch.load(entry / "ranker.pt", weights_only=True)
    blob["meta"]["schema_version"] = 0
    torch.save(blob, entry / "ranker.pt")
    with pytest.raises(RankerCheckpointError, match="schema_version is 0"):
        model_files.load_models({"ranker": entry / "ranker.pt"})


def test_a_missing_entry_is_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = make_config("tiny", pipeline={"scorer": "learned"})  # the ranker alone asks for an entry too
    built: list[str] = []
    orig = prov.build_entry

    def counting(*a, **k):
        built.append(a[1].name)
        return orig(*a, **k)

    monkeypatch.setattr(prov, "build_entry", counting)
    small = dataclasses.replace(BUDGET, users=6, steps=10)
    paths = prov.ensure_rankers(cfg, progress=False, cache_dir=tmp_path, training=small)
    assert set(paths) == {"two_tower", "preranker", "ranker"} and all(p.is_file() for p in paths.values())
    assert prov.learned_models(cfg, cache_dir=tmp_path).keys() == {"ranker"}
    prov.ensure_rankers(cfg, progress=False, cache_dir=tmp_path)
    assert built == [prov.cache_key(cfg)]
    manifest = (tmp_path / prov.cache_key(cfg) / "manifest.json").read_text()
    assert '"behaviour": "GaussianKnobs(0.3)"' in manifest and '"users": 6' in manifest



def test_entries_built_at_once_equal_entries_built_one_by_one(tmp_path: Path) -> None:
    # the main job builds its world's and the shifted world's rankers in two processes: the same files
    small = dataclasses.replace(BUDGET, users=6, steps=10)
    cfgs = [el.learned_pipeline(make_config("tiny")), el.learned_pipeline(make_config("tiny-shift"))]
    for c in cfgs:
        prov.ensure_rankers(c, progress=False, cache_dir=tmp_path / "one", training=small)
    assert prov.ensure_rankers_all([*cfgs, cfgs[0]], progress=False, cache_dir=tmp_path / "both",
                                 training=small) == ["tiny", "tiny-shift"]

    def checksums(root: Path, c) -> dict:
        return json.loads((root / prov.cache_key(c) / "manifest.json").read_text())[prov.MANIFEST_SHA256]

    for c in cfgs:
        assert checksums(tmp_path / "both", c) == checksums(tmp_path / "one", c), c.preset
    assert prov.ensure_rankers_all(cfgs, progress=False, cache_dir=tmp_path / "both") == []  # nothing left to build
    assert prov.ensure_rankers_all([make_config("tiny")], cache_dir=tmp_path / "none") == []  # noisy oracle: no models
    assert not (tmp_path / "none").exists()


def test_a_failed_build_in_a_child_process_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfgs = [el.learned_pipeline(make_config("tiny")), el.learned_pipeline(make_config("tiny-shift"))]
    orig = prov.build_entry

    def failing_shift(cfg, *a, **k):
        if cfg.preset == "tiny-shift":
            raise OSError("disk full (simulated)")
        return orig(cfg, *a, **k)

    monkeypatch.setattr(prov, "build_entry", failing_shift)
    with pytest.raises(RuntimeError, match="learned rankers of 'tiny-shift' failed in a child process"):
        prov.ensure_rankers_all(cfgs, progress=False, cache_dir=tmp_path,
                              training=dataclasses.replace(BUDGET, users=6, steps=10))
    assert (tmp_path / prov.cache_key(cfgs[0]) / "manifest.json").is_file()  # the other entry is built
    assert not (tmp_path / prov.cache_key(cfgs[1])).exists()


def test_prune_cache_removes_other_codes_entries_and_killed_builds(cache, learned, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import fcntl
    import json

    root = tmp_path / "cache"
    root.mkdir()
    key = prov.cache_key(learned)
    shutil.copytree(cache / key, root / key)  # this code's entry: kept

    def entry(name: str, code: str | None) -> Path:
        shutil.copytree(cache / key, root / name)
        manifest = json.loads((root / name / "manifest.json").read_text())
        manifest.pop("code")
        if code is not None:
            manifest["code"] = code
        (root / name / "manifest.json").write_text(json.dumps(manifest))
        return root / name

    other = entry("v2-tiny-aaaaaaaaaaaa-schema1", "0" * 16)  # built by other code
    older = entry("v2-tiny-bbbbbbbbbbbb-schema1", None)  # built before entries recorded their code
    held = entry("v2-tiny-cccccccccccc-schema1", "1" * 16)  # other code, but a build holds its lock
    (root / "v2-tiny-dddddddddddd-schema1").mkdir()  # incomplete, no manifest: kept (loading names it)
    unreadable = entry("v2-tiny-eeeeeeeeeeee-schema1", "2" * 16)
    (unreadable / "manifest.json").write_text("{not json")
    killed = root / f".tmp-{key}-k1ll3d_0"  # a build that died before its rename
    killed.mkdir()
    (killed / "ranker.pt").write_bytes(b"partial")
    running = root / ".tmp-v2-tiny-ffffffffffff-schema1-runn1ng"
    running.mkdir()
    for k in (key, "v2-tiny-ffffffffffff-schema1", held.name):
        (root / f".lock-{k}").touch()
    with contextlib.ExitStack() as stack:
        for k in ("v2-tiny-ffffffffffff-schema1", held.name):  # what a running build_entry holds
            fcntl.flock(stack.enter_context(open(root / f".lock-{k}")), fcntl.LOCK_EX)
        listed = prov.prune_cache(root, dry_run=True)
        assert sorted(listed) == sorted([other, older, killed])
        assert all(p.exists() for p in listed)
        assert prov.prune_cache(root) == listed
    assert not any(p.exists() for p in listed)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [key, held.name, "v2-tiny-dddddddddddd-schema1", unreadable.name, running.name,
         f".lock-{key}", ".lock-v2-tiny-ffffffffffff-schema1", f".lock-{held.name}"])
    monkeypatch.setenv(prov.CACHE_ENV, str(root))
    assert prov.learned_models(learned, progress=False).keys() == {"two_tower", "preranker", "ranker"}  # still served
    res = _script("train_rankers").main(_script("train_rankers").Args(prune_cache=True))
    assert res == {"pruned": [str(p) for p in sorted([held, running])]}  # their builders are gone now
    assert prov.prune_cache(tmp_path / "nowhere") == []


def test_content_pipeline_needs_no_models() -> None:
    sim = FeedSimulator(make_config("tiny"), 2, seed=0)
    assert isinstance(sim.pipeline.index, EmbeddingIndex)
    with pytest.raises(ValueError, match="needs a trained TwoTower"):
        from rankers.sourcing import make_index

        make_index(dataclasses.replace(sim.cfg.pipeline, retrieval="two_tower"), sim.corpus.catalog)


def test_rankers_import_nothing_of_envs_agents_or_offline_data() -> None:
    bad = {}
    for f in sorted((ROOT / "rankers").rglob("*.py")):
        mods = [m for m in imported_modules(f) if m.split(".")[0] in ("envs", "agents", "offline_data")]
        if mods:
            bad[f.name] = mods
    assert not bad, bad


def _script(name: str):
    key = f"script_{name}"
    if key not in sys.modules:  # registered first: dataclasses look their module up there
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


def test_benchmark_measures_the_learned_pipeline(cache, tmp_path: Path) -> None:
    bm = _script("benchmark")
    res = bm.main(bm.Args(presets=("tiny",), batch_sizes=(4,), steps=2, warmup=1, latency_requests=5, recsim=False,
                          learned=True, learned_batch=4, out=tmp_path, progress=False))
    (saved,) = tmp_path.glob("benchmark-*.json")  # --out is a Path: it used to stop json.dumps after the run
    doc = json.loads(saved.read_text())
    assert doc["args"]["out"] == str(tmp_path) and len(doc["throughput"]) == 2
    assert saved.with_suffix(".md").read_text().count("learned") >= 1
    assert [(r.setting, r.batch) for r in res.throughput] == [("noisy_oracle", 4), ("learned", 4)]
    assert [r.setting for r in res.latency] == ["noisy_oracle", "learned"]
    assert res.throughput[1].user_steps_per_s > 0 and res.latency[1].p99_ms["total"] > 0
    lat = res.latency[1]  # the request path is the step without the model batch jobs that fell due
    assert lat.p50_ms["request"] <= lat.p50_ms["total"] and "index" in lat.p50_ms


def test_benchmark_times_the_two_tower_index(cache) -> None:
    """``--retrieval-pipeline learned``: the item-tower vectors in the preset's index, searched with user-tower
    queries; an IVF index probed in full finds the exact top-k of those vectors."""
    bm = _script("benchmark")
    cfg = el.learned_pipeline(make_config("tiny", pipeline={"index": "ivf", "ivf_nlist": 16, "ivf_nprobe": 1}))
    rows = bm.measure_retrieval(cfg, queries=10, recall_queries=8, seed=0, nprobes=(16,))
    assert [(r.retrieval, r.index, r.nprobe) for r in rows] == [("two_tower", "ivf", 1), ("two_tower", "ivf", 16)]
    assert rows[1].recall == pytest.approx(1.0) and rows[0].recall < 1.0
    assert all(r.p99_ms >= r.p50_ms > 0 for r in rows)
    res = bm.main(bm.Args(presets=(), recsim=False, latency_preset="none", retrieval_preset="tiny",
                          retrieval_pipeline="learned", retrieval_queries=5, save=False, progress=False))
    assert [(r.retrieval, r.index) for r in res.retrieval] == [("two_tower", "flat")]
    def measured(*a, **k):
        raise AssertionError("a measurement ran before the arguments were checked")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bm, "measure_throughput", measured)
        with pytest.raises(ValueError, match="pipeline='trained' is invalid"):
            bm.main(bm.Args(presets=("tiny",), recsim=False, latency_preset="none", retrieval_preset="tiny",
                            retrieval_pipeline="trained", save=False, progress=False))


def test_train_rankers_script_writes_checkpoints_the_env_loads(tmp_path: Path) -> None:
    tr = _script("train_rankers")
    args = tr.Args(preset="tiny", training=prov.RankerTraining(users=8, steps=12, epochs=1), eval_users=3, eval_steps=4,
                   recall_k=20, out=tmp_path, progress=False)
    report = tr.main(args)
    assert set(report["train_seconds"]) == {"two_tower", "preranker", "ranker"}
    models = model_files.load_models({k: tmp_path / "tiny" / f"{k}.pt" for k in ("two_tower", "preranker", "ranker")},
                            {"preset": "tiny"})
    sim = FeedSimulator(make_config("tiny"), 2, seed=0)
    from rankers.pipeline import Pipeline

    pipe = Pipeline(el.learned_pipeline(sim.cfg).pipeline, sim.corpus.catalog, sim.view, sim._truth, models=models)
    assert isinstance(pipe.index, TwoTowerIndex) and isinstance(pipe.scorer, LearnedScorer)


def test_stored_rollouts_key_on_the_rankers_served(cache, learned, tmp_path: Path) -> None:
    """entry_digest names the cache entry and its checkpoints' sha256 (none for the noisy-oracle pipeline); a
    stored rollout of the learned pipeline is keyed on them, so rankers rebuilt differently miss it."""
    from agents.policies import WeightedSum
    from agents.rollout_store import RolloutStore
    from agents.rollouts import RolloutJob

    d = prov.entry_digest(learned)
    manifest = json.loads((cache / prov.cache_key(learned) / prov.MANIFEST).read_text())
    assert d == {"key": prov.cache_key(learned), "sha256": manifest[prov.MANIFEST_SHA256]}
    assert prov.entry_digest(el.noisy_oracle_pipeline(learned)) is None
    assert prov.entry_digest(learned, cache_dir=tmp_path / "empty") == {"key": prov.cache_key(learned)}  # not built
    job = RolloutJob(WeightedSum(), learned, 3, 0, store=tmp_path / "rollouts")
    store = RolloutStore(tmp_path / "rollouts")
    before = store.key(job)
    entry = cache / prov.cache_key(learned)
    (entry / prov.MANIFEST).write_text(json.dumps({**manifest, prov.MANIFEST_SHA256: {"ranker.pt": "0" * 64}}))
    try:
        assert store.key(job) != before
    finally:
        (entry / prov.MANIFEST).write_text(json.dumps(manifest))
    assert store.key(job) == before


def test_an_executor_job_brings_the_models_its_world_serves(learned) -> None:
    """An executor's worker is a fresh process that was never provisioned: a rollout job and a collection shard
    carry the trained models their world serves, and give the driver's results."""
    from agents.policies import WeightedSum
    from agents.rollouts import RolloutJob, models_for, rollout, run_rollout
    from offline_data import GaussianKnobs, collect
    from offline_data.executor import LocalExecutor

    job = RolloutJob(WeightedSum(), learned, 3, 0)
    models = models_for([job.served])
    assert [sorted(m) for _, m in models] == [["preranker", "ranker", "two_tower"]]
    want = rollout(job.policy, learned, 3, 0)
    ds = collect(GaussianKnobs(0.3), learned, n_users=4, n_steps=5, seed=1, worlds=2)
    el.forget_models()  # as in a worker
    try:
        with pytest.raises(el.MissingModelsError):
            rollout(job.policy, learned, 3, 0)
        got = LocalExecutor().map(run_rollout, [job], common=models)[0]
    finally:
        prov.learned_models(learned, progress=False)  # the module's other tests are served again
    np.testing.assert_array_equal(got.per_user["engagement/watch_minutes"], want.per_user["engagement/watch_minutes"])
    el.forget_models()
    try:
        with pytest.raises(el.MissingModelsError):
            collect(GaussianKnobs(0.3), learned, n_users=4, n_steps=5, seed=1, worlds=2)
    finally:
        prov.learned_models(learned, progress=False)
    assert collect(GaussianKnobs(0.3), learned, n_users=4, n_steps=5, seed=1, worlds=2).transitions.rewards.tobytes() \
        == ds.transitions.rewards.tobytes()
