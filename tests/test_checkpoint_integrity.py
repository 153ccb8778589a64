"""Checkpoint integrity: a damaged, incomplete or foreign checkpoint raises an error naming the file and the
problem (never loads with other weights or fails deep in a library), ``restart_mismatched`` sets it aside
(nothing is deleted) and trains afresh, and an agent refuses a simulator of another observation size.

Tiny budgets: PPO on ``tiny`` for 256 steps, CQL for a few gradient steps on a synthetic log of ``tiny``'s
observation size."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest

import agents.cql as cql_mod
import agents.ppo as ppo_mod
from agents.checkpoints import (
    MODEL_SHA256,
    CheckpointMismatchError,
    CorruptCheckpointError,
)
from agents.cql import CQLParams, load_cql, train_cql
from agents.loading import load_agent
from agents.ppo import PPOParams, load_ppo, train_ppo
from agents.rollouts import rollout
from envs.config import make_config
from envs.observation import ObservationLayout
from envs.simulator import FeedSimulator
from rankers.config import N_KNOBS
from rankers.fileio import file_sha256

PPO_KW = {"num_envs": 4, "seed": 0, "params": PPOParams(n_steps=64, batch_size=64)}
CQL_KW = {"steps_per_epoch": 5, "params": replace(CQLParams(), batch_size=16, n_action_samples=2),
          "dataset_id": {"log": "synthetic"}}


@pytest.fixture(scope="module")
def tiny():
    return make_config("tiny")


@pytest.fixture(scope="module")
def dataset(tiny):
    import d3rlpy

    rng = np.random.default_rng(0)
    n, d = 64, ObservationLayout(tiny).dim
    obs = rng.standard_normal((n, d)).astype(np.float32)
    act = rng.uniform(-1, 1, (n, N_KNOBS)).astype(np.float32)
    return d3rlpy.dataset.MDPDataset(obs, act, rng.standard_normal(n).astype(np.float32),
                                     (np.arange(n) % 8 == 7).astype(np.float32),
                                     action_space=d3rlpy.ActionSpace.CONTINUOUS)


@pytest.fixture(scope="module")
def ppo_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo") / "ppo"
    train_ppo(tiny, 256, out, **PPO_KW)
    return out


@pytest.fixture(scope="module")
def cql_dir(tiny, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("cql") / "cql"
    train_cql(dataset, tiny, 5, out, **CQL_KW)
    return out


def copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / src.name
    shutil.copytree(src, dest)
    return dest


def damage(path: Path, at: float, n: int) -> None:
    """Overwrites ``n`` bytes of ``path`` at fraction ``at`` of its length with zeros (a bit-rot stand-in)."""
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(n)
    path.write_bytes(bytes(data))


def drop_hash(meta_path: Path) -> None:
    """Removes the model's sha256 from the metadata."""
    meta = json.loads(meta_path.read_text())
    meta.pop(MODEL_SHA256, None)
    meta_path.write_text(json.dumps(meta))


def rehash(meta_path: Path, model: Path) -> None:
    """Records the (damaged) model's own sha256 in the metadata, so loading reaches the library."""
    meta = json.loads(meta_path.read_text())
    meta[MODEL_SHA256] = file_sha256(model)
    meta_path.write_text(json.dumps(meta))


def assert_set_aside(out: Path, *names: str) -> None:
    stale = out.with_name(f"{out.name}.stale-0")
    assert stale.is_dir(), "restart_mismatched must move the checkpoint aside, not delete it"
    for name in names:
        assert (stale / name).exists(), name


def refused_then_set_aside(out: Path, words: str, train, *kept: str) -> None:
    """Loading (``load_agent``) and resuming (``train(restart_mismatched=False)``) raise
    :class:`CorruptCheckpointError` matching ``words``; ``train(restart_mismatched=True)`` moves the checkpoint
    aside with the files ``kept``, and trains afresh."""
    with pytest.raises(CorruptCheckpointError, match=words):
        load_agent(out)
    with pytest.raises(CorruptCheckpointError, match=words):
        train(restart_mismatched=False)
    train(restart_mismatched=True)
    assert_set_aside(out, *kept)


# ------------------------------------------------------------------------------------------- 1. corrupt models
def test_a_corrupt_cql_model_is_refused_and_restarting_sets_it_aside(tiny, dataset, cql_dir, tmp_path):
    out = copy(cql_dir, tmp_path)
    damage(out / cql_mod.CHECKPOINT, 0.5, 64)
    refused_then_set_aside(out, r"cql\.d3 does not match its metadata cql\.json.*damaged",
                           partial(train_cql, dataset, tiny, 10, out, **CQL_KW), cql_mod.CHECKPOINT, cql_mod.META)
    assert json.loads((out / cql_mod.META).read_text())["steps"] == 10  # trained afresh, not resumed
    load_agent(out)  # the new checkpoint is consistent


def test_a_corrupt_learned_ranker_cache_entry_is_refused(tmp_path, monkeypatch):
    import envs.learned as el
    import offline_data.provision as prov
    from rankers.model_files import RankerCheckpointError

    monkeypatch.setenv(prov.CACHE_ENV, str(tmp_path))
    cfg = el.learned_pipeline(make_config("tiny"))
    prov.ensure_rankers(cfg, progress=False, training=prov.RankerTraining(users=12, steps=20, epochs=1))
    entry = tmp_path / prov.cache_key(cfg)
    damage(entry / "ranker.pt", 0.6, 32)
    monkeypatch.setattr(prov, "_LOADED", {})  # load from disk, as a new process would
    with pytest.raises(RankerCheckpointError, match=r"entry .* is corrupt: ranker\.pt does not match.*delete"):
        prov.ensure_rankers(cfg, progress=False)
    with pytest.raises(RankerCheckpointError, match="corrupt"):
        prov.learned_models(cfg, progress=False)
    recorded = json.loads((entry / prov.MANIFEST).read_text())[prov.MANIFEST_SHA256]
    assert set(recorded) == {"two_tower.pt", "preranker.pt", "ranker.pt"}  # one hash per file


# ------------------------------------------------------------------------- 2. model and metadata consistent
def kill_before(module, name: str, monkeypatch):
    """Makes ``module``'s atomic writes of the file ``name`` die as a killed process would (after the writes
    before it)."""
    real = module.atomic_write

    def dying(path, data):
        if Path(path).name == name:
            raise SystemExit("killed")
        return real(path, data)

    monkeypatch.setattr(module, "atomic_write", dying)


def test_a_ppo_run_killed_between_model_and_metadata_is_not_resumed_as_consistent(tiny, ppo_dir, tmp_path,
                                                                                   monkeypatch):
    out = copy(ppo_dir, tmp_path)
    with monkeypatch.context() as mp:
        kill_before(ppo_mod, ppo_mod.META, mp)
        with pytest.raises(SystemExit):
            train_ppo(tiny, 512, out, **PPO_KW)  # the new zip is written, its metadata is not
    assert json.loads((out / ppo_mod.META).read_text())["num_timesteps"] == 256
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint\.zip does not match its metadata.*killed"):
        load_ppo(out, tiny)
    with pytest.raises(CorruptCheckpointError, match="does not match"):
        load_agent(out)
    model = train_ppo(tiny, 256, out, restart_mismatched=True, **PPO_KW)
    assert_set_aside(out, ppo_mod.CHECKPOINT, ppo_mod.META)
    assert model.num_timesteps == 256
    load_ppo(out, tiny)


def test_a_ppo_model_without_its_metadata_is_an_incomplete_checkpoint(tiny, ppo_dir, tmp_path):
    out = copy(ppo_dir, tmp_path)
    (out / ppo_mod.META).unlink()  # killed after the first model write
    with pytest.raises(CorruptCheckpointError, match=r"incomplete: checkpoint\.zip without checkpoint\.json"):
        train_ppo(tiny, 256, out, **PPO_KW)
    train_ppo(tiny, 256, out, restart_mismatched=True, **PPO_KW)  # the main job's mode: no FileNotFoundError
    assert_set_aside(out, ppo_mod.CHECKPOINT)
    load_ppo(out, tiny)
    with pytest.raises(FileNotFoundError, match="no PPO checkpoint"):
        load_ppo(tmp_path / "nothing", tiny)


def test_a_cql_run_killed_between_model_and_metadata_does_not_retrain_an_epoch_silently(tiny, dataset, cql_dir,
                                                                                        tmp_path, monkeypatch):
    out = copy(cql_dir, tmp_path)
    with monkeypatch.context() as mp:
        kill_before(cql_mod, cql_mod.META, mp)
        with pytest.raises(SystemExit):
            train_cql(dataset, tiny, 10, out, **CQL_KW)  # epoch 2's model is written, its metadata is not
    assert json.loads((out / cql_mod.META).read_text())["steps"] == 5
    with pytest.raises(CorruptCheckpointError, match=r"cql\.d3 does not match its metadata"):
        load_cql(out, tiny)
    with pytest.raises(CorruptCheckpointError, match="does not match"):
        train_cql(dataset, tiny, 10, out, **CQL_KW)
    train_cql(dataset, tiny, 10, out, restart_mismatched=True, **CQL_KW)
    assert_set_aside(out, cql_mod.CHECKPOINT, cql_mod.META)
    assert json.loads((out / cql_mod.META).read_text())["steps"] == 10


def test_cql_model_is_written_with_the_atomic_fsyncing_writer(tiny, dataset, tmp_path, monkeypatch):
    written: list[str] = []
    real = cql_mod.atomic_write
    monkeypatch.setattr(cql_mod, "atomic_write", lambda p, d: (written.append(Path(p).name), real(p, d))[1])
    out = tmp_path / "cql"
    train_cql(dataset, tiny, 5, out, **CQL_KW)
    assert written == [cql_mod.CHECKPOINT, cql_mod.META]  # the model first, then its metadata
    assert sorted(p.name for p in out.iterdir()) == [cql_mod.CHECKPOINT, cql_mod.META]  # no scratch file left
    assert json.loads((out / cql_mod.META).read_text())[MODEL_SHA256] == file_sha256(out / cql_mod.CHECKPOINT)


# ------------------------------------------------------------------------------- 3. damaged checkpoint files
@pytest.mark.parametrize("how", ["garbage", "truncated", "zeroed"])
def test_a_damaged_ppo_zip_raises_a_named_error_and_restart_sets_it_aside(tiny, ppo_dir, tmp_path, how):
    out = copy(ppo_dir, tmp_path)
    z = out / ppo_mod.CHECKPOINT
    if how == "garbage":
        z.write_bytes(b"not a zip file at all" * 10)
    elif how == "truncated":
        z.write_bytes(z.read_bytes()[: z.stat().st_size // 2])
    else:
        damage(z, 0.95, 2000)  # the zip's central directory
    rehash(out / ppo_mod.META, z)  # the hash matches: the library's own failure is named
    refused_then_set_aside(out, r"checkpoint\.zip cannot be loaded by stable-baselines3",
                           partial(train_ppo, tiny, 256, out, **PPO_KW), ppo_mod.CHECKPOINT, ppo_mod.META)


def test_a_garbage_cql_model_raises_a_named_error(tiny, dataset, cql_dir, tmp_path):
    out = copy(cql_dir, tmp_path)
    (out / cql_mod.CHECKPOINT).write_bytes(b"\x00garbage" * 50)
    rehash(out / cql_mod.META, out / cql_mod.CHECKPOINT)
    refused_then_set_aside(out, r"cql\.d3 cannot be loaded by d3rlpy", partial(train_cql, dataset, tiny, 10, out,
                                                                              **CQL_KW), cql_mod.CHECKPOINT)


@pytest.mark.parametrize(("text", "words"), [("{not json", r"checkpoint\.json is not valid JSON"),
                                             ("[1, 2]", r"checkpoint\.json holds a JSON list, not an object")])
def test_damaged_ppo_metadata_raises_a_named_error(tiny, ppo_dir, tmp_path, text, words):
    out = copy(ppo_dir, tmp_path)
    (out / ppo_mod.META).write_text(text)
    refused_then_set_aside(out, words, partial(train_ppo, tiny, 256, out, **PPO_KW), ppo_mod.CHECKPOINT, ppo_mod.META)


def test_cql_metadata_without_steps_raises_a_named_error(tiny, dataset, cql_dir, tmp_path):
    out = copy(cql_dir, tmp_path)
    meta = json.loads((out / cql_mod.META).read_text())
    del meta["steps"]
    (out / cql_mod.META).write_text(json.dumps(meta))
    refused_then_set_aside(out, r"cql\.json lacks steps", partial(train_cql, dataset, tiny, 10, out, **CQL_KW),
                           cql_mod.META)


def test_resuming_discrete_ppo_into_a_continuous_checkpoint_is_a_mismatch(tiny, ppo_dir, tmp_path):
    out = copy(ppo_dir, tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"is continuous \(knobs\); requested discrete"):
        train_ppo(tiny, 256, out, discrete=True, **PPO_KW)
    train_ppo(tiny, 256, out, discrete=True, restart_mismatched=True, **PPO_KW)
    assert_set_aside(out, ppo_mod.CHECKPOINT)
    assert json.loads((out / ppo_mod.META).read_text())["discrete"] is True


def test_checkpoints_without_a_recorded_hash_are_refused(tiny, dataset, ppo_dir, cql_dir, tmp_path):
    """No release wrote a checkpoint without its model's sha256: one without it is damaged, not old."""
    ppo, cql = copy(ppo_dir, tmp_path), copy(cql_dir, tmp_path)
    drop_hash(ppo / ppo_mod.META)
    drop_hash(cql / cql_mod.META)
    for out in (ppo, cql):
        with pytest.raises(CorruptCheckpointError, match=f"records no {MODEL_SHA256}"):
            load_agent(out)
    with pytest.raises(CorruptCheckpointError, match=f"records no {MODEL_SHA256}"):
        train_cql(dataset, tiny, 10, cql, **CQL_KW)


# ------------------------------------------------------------------------------ 4. another observation size
def small_cfg():
    from envs.learned import noisy_oracle_pipeline

    return noisy_oracle_pipeline(make_config("small"))  # no learned-ranker build for this check


@pytest.mark.parametrize("kind", ["ppo", "cql"])
def test_an_agent_refuses_a_simulator_of_another_observation_size(tiny, ppo_dir, cql_dir, kind):
    agent = load_agent(ppo_dir if kind == "ppo" else cql_dir)
    small = small_cfg()
    d_tiny, d_small = ObservationLayout(tiny).dim, ObservationLayout(small).dim
    assert d_tiny != d_small
    words = rf"trained on preset 'tiny' with {d_tiny}-dim observations; the simulator of preset 'small' gives " \
            rf"{d_small}-dim"
    with pytest.raises(ValueError, match=words):
        rollout(agent, small, 2, seed=0)
    with pytest.raises(ValueError, match=rf"'tiny' with {d_tiny}-dim observations; it is given {d_small}-dim"):
        agent.act(np.zeros((2, d_small), np.float32))
    sim = FeedSimulator(tiny, 2, seed=0)
    agent.bind(sim)  # its own preset is fine
    assert agent.act(sim.reset()).shape == (2, N_KNOBS)
