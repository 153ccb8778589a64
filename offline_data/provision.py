"""Provisioning the learned rankers: collect a log, train the three models, cache them, and serve them to
this process's simulators (:func:`envs.learned.provide_models`). The env never does this on its own; it
happens where the user asks for it: :func:`ensure_rankers` (:func:`ensure_rankers_all` for several worlds at
once), :func:`learned_models`, or the ``gym.make`` / ``gym.make_vec`` entry points of the registered env ids
(:data:`make_feed_env` and its siblings), which provision what the config needs before they build the env.

:func:`ensure_rankers` looks for the three checkpoints (two-tower, pre-ranker, ranker) under a versioned cache
key::

    <cache root>/<ENV_VERSION>-<preset>-<hash>-schema<FEATURE_SCHEMA_VERSION>/{two_tower,preranker,ranker}.pt

where ``<hash>`` covers every config field the logs and models depend on (corpus, users, stages 1-3
of the pipeline, horizon, churn, clock, population, step cap) and the code that builds an entry
(:func:`code_digest` of the ``envs``, ``rankers`` and ``offline_data`` sources, which hold the whole
recipe, so an entry built by other code is never reused: same code, same config, same models); the
reward and the serving policy (:data:`envs.learned.SERVING_FIELDS`: which models serve, stage 3's weights,
stage 4) do not enter. The cache root is the ``FEEDGYM_CACHE`` environment variable, else
``~/.cache/feedgym/rankers`` (``$XDG_CACHE_HOME`` honoured). If no entry matches, it collects a log in the same
world with a non-oracle behaviour policy (the weighted-sum knobs with truncated-normal noise,
:class:`offline_data.policies.GaussianKnobs`, served by the default noisy-oracle pipeline), trains the three
models with progress bars and moves the finished entry into place atomically (a temporary directory renamed;
concurrent builders are serialised by a lock file). Loading checks each checkpoint's sha256 against the one
the manifest records, so a damaged file is refused (delete the entry to rebuild) rather than served with
other weights, then each checkpoint's kind, preset, cache key and item-feature dims, so an entry copied from
another preset or schema is refused with :class:`rankers.model_files.RankerCheckpointError`.

The training budget (:class:`RankerTraining`) is recorded in the entry's ``manifest.json``, not in
the key: the first entry built for a configuration and code is the one used (delete the directory to
rebuild with another budget).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from envs.config import ENV_VERSION, FeedConfig
from envs.feed_env import DiscreteFeedEnv, DiscreteFeedVectorEnv, FeedEnv, FeedVectorEnv, resolve_config
from envs.learned import logging_config, provide_models
from offline_data.ranker_rows import collect_rows
from rankers.fileio import atomic_write, file_sha256
from rankers.model_files import CHECKPOINT_FORMAT, RankerCheckpointError, load_models, save_models
from rankers.models import FEATURE_SCHEMA_VERSION, MODEL_KINDS
from rankers.training import TrainConfig, train_models

CACHE_ENV = "FEEDGYM_CACHE"
"""Environment variable naming the cache root."""
CODE_PACKAGES: tuple[str, ...] = ("envs", "rankers", "offline_data")
"""The packages whose sources build a cache entry (the world, the logging policy, features, training)."""
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = "manifest.json"
MANIFEST_SHA256 = "sha256"
"""Manifest key of ``{file name: sha256}`` of the entry's checkpoints, checked before they are loaded."""
TMP_PREFIX = ".tmp-"
"""Name prefix of the directory an entry is built in (``<prefix><key>-<random>``) before its rename."""


@dataclass(frozen=True)
class RankerTraining:
    """Budget of a cache entry: the logged data and the training of the three models."""

    users: int = 64
    """Simulator slots (B) of the collection."""
    steps: int = 200
    """Batched collection steps (autoreset): users x steps requests, ~10 impressions each."""
    sigma: float = 0.3
    """Knob noise of the truncated-normal behaviour policy around the weighted sum."""
    seed: int = 0
    """Seeds the collection's world and users and the training."""
    epochs: int = 6
    batch_size: int = 512
    lr: float = 3e-3
    hidden: int = 64
    """Width of the models' hidden layers."""

    def train_config(self, watch_time_scale_s: float, progress: bool = True) -> TrainConfig:
        """The training loops' config for this budget."""
        return TrainConfig(epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=self.seed,
                           progress=progress, watch_time_scale_s=watch_time_scale_s)



@functools.cache
def code_digest(root: Path = PROJECT_ROOT, packages: tuple[str, ...] = CODE_PACKAGES) -> str:
    """sha256 (16 hex) of every ``*.py`` under ``packages`` (default :data:`CODE_PACKAGES`) of ``root`` (paths
    and bytes, in path order). Any edit to the code that collects the log or trains the models changes it, so
    an entry built before the edit is not reused: without it an entry built by earlier code under the same
    config served later runs, whose numbers then depended on when the cache was first filled."""
    h = hashlib.sha256()
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def cache_fields(cfg: FeedConfig) -> dict[str, Any]:
    """What a cache entry depends on: the config fields of :func:`logging_config` but the reward and the
    preset's name, the checkpoint format and the digest of the code that builds it (the recipe)."""
    d = logging_config(cfg).to_dict()
    d.pop("reward")
    d.pop("preset")
    return {"config": d, "checkpoint_format": CHECKPOINT_FORMAT, "code": code_digest()}


def cache_key(cfg: FeedConfig) -> str:
    """``<ENV_VERSION>-<preset>-<12 hex of the hash of cache_fields>-schema<FEATURE_SCHEMA_VERSION>``."""
    blob = json.dumps(cache_fields(cfg), sort_keys=True, default=str).encode()
    return f"{ENV_VERSION}-{cfg.preset}-{hashlib.sha256(blob).hexdigest()[:12]}-schema{FEATURE_SCHEMA_VERSION}"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$FEEDGYM_CACHE``, else the user's cache directory (``$XDG_CACHE_HOME/feedgym/rankers``,
    ``~/.cache/feedgym/rankers`` without it): never inside the installed package."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "feedgym" / "rankers"


def entry_paths(entry: Path) -> dict[str, Path]:
    return {kind: entry / f"{kind}.pt" for kind in MODEL_KINDS}


def _complete(entry: Path) -> bool:
    return (entry / MANIFEST).is_file() and all(p.is_file() for p in entry_paths(entry).values())


def entry_digest(cfg: FeedConfig, cache_dir: str | Path | None = None) -> dict[str, Any] | None:
    """What the models ``cfg`` would be served with are: the cache key and the sha256 of each checkpoint of its
    entry (from the manifest), None if ``cfg`` needs no trained model, ``{"key": key}`` alone while the entry
    is not built. Results that depend on the models (stored rollouts) key on it, so an
    entry rebuilt with another budget (:class:`RankerTraining`) does not serve the old one's."""
    if not cfg.pipeline.learned_models:
        return None
    key = cache_key(cfg)
    entry = cache_root(cache_dir) / key
    try:
        sha = json.loads((entry / MANIFEST).read_text()).get(MANIFEST_SHA256) if _complete(entry) else None
    except (OSError, ValueError):
        sha = None
    return {"key": key, **({"sha256": sha} if sha else {})}


def verify_entry(entry: Path) -> None:
    """Raises :class:`RankerCheckpointError` if a checkpoint of ``entry`` does not have the sha256 its
    manifest records (a damaged file would load and serve with other weights), or the manifest is unreadable
    or records no sha256 of one of them."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise RankerCheckpointError(f"the learned-ranker cache entry {entry} has an unreadable {MANIFEST} ({err}): "
                                      "delete the entry to rebuild it") from err
    recorded = manifest.get(MANIFEST_SHA256) if isinstance(manifest, dict) else None
    for path in entry_paths(entry).values():
        want = recorded.get(path.name) if isinstance(recorded, dict) else None
        if want is None:
            raise RankerCheckpointError(f"the learned-ranker cache entry {entry} is corrupt: its {MANIFEST} records "
                                        f"no sha256 of {path.name}: delete the entry to rebuild it")
        if file_sha256(path) != want:
            raise RankerCheckpointError(f"the learned-ranker cache entry {entry} is corrupt: {path.name} does not "
                                          f"match the sha256 recorded in its {MANIFEST} (the file was damaged or "
                                          "changed after the build): delete the entry to rebuild it")


def _expected_meta(cfg: FeedConfig, key: str) -> dict[str, Any]:
    c = cfg.corpus
    return {"preset": cfg.preset, "cache_key": key,
            "item_feature_dims": {"emb_dim": c.emb_dim, "n_topics": c.n_topics, "n_formats": c.n_formats}}


def build_entry(cfg: FeedConfig, entry: Path, training: RankerTraining, progress: bool = True) -> None:
    """Collects, trains and writes a complete entry at ``entry`` (which must not exist yet):
    written into a temporary sibling directory first, then renamed."""
    key = entry.name
    t0 = time.perf_counter()
    if progress:
        print(f"feedgym: no learned-ranker checkpoints for {key} in {entry.parent}; collecting "
              f"{training.users} x {training.steps} requests and training the two-tower, pre-ranker and "
              f"ranker (once; cached)", file=sys.stderr, flush=True)
    rows, src = collect_rows(cfg, training.users, training.steps, training.sigma, training.seed, progress)
    c = cfg.corpus
    tc = training.train_config(cfg.pipeline.watch_time_scale_s, progress)
    models, secs = train_models(rows, {"emb_dim": c.emb_dim, "n_topics": c.n_topics, "n_formats": c.n_formats},
                                tc, hidden=training.hidden)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f"{TMP_PREFIX}{key}-"))
    try:
        save_models(tmp, models, cfg.preset, cache_key=key, train_config=asdict(tc), data=src)
        manifest = {"cache_key": key, "preset": cfg.preset, "env_version": ENV_VERSION,
                    "schema_version": FEATURE_SCHEMA_VERSION,
                    "training": asdict(training), "data": src, "train_seconds": secs,
                    "build_seconds": round(time.perf_counter() - t0, 2), "created": time.strftime("%Y-%m-%d %H:%M:%S"),
                    **cache_fields(cfg)}
        manifest[MANIFEST_SHA256] = {p.name: file_sha256(p) for p in entry_paths(tmp).values()}
        atomic_write(tmp / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"feedgym: learned rankers cached in {entry} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr,
              flush=True)


@contextlib.contextmanager
def _lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def lock_path(root: Path, key: str) -> Path:
    """The lock file that serialises the builders of the entry ``key`` under ``root``."""
    return root / f".lock-{key}"


def _build_running(root: Path, key: str) -> bool:
    """Whether a builder holds the lock of ``key`` under ``root`` now (a non-blocking try of its lock)."""
    lock = lock_path(root, key)
    if not lock.exists():
        return False
    with open(lock) as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def prune_cache(cache_dir: str | Path | None = None, dry_run: bool = False) -> list[Path]:
    """Removes what no run of this code can use from the cache root (default :func:`cache_root`) and returns
    it: entries built by other code (their manifest's ``code`` is not :func:`code_digest`; every edit of
    the sources leaves one behind), temporary directories of builds that were killed (no builder holds
    their lock). Entries of this code, complete or not, anything a running build holds, and the (empty)
    lock files are kept: removing a lock another process is opening would let two builders run at once.
    ``dry_run``: only list them."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return []
    code, gone = code_digest(), []
    for path in sorted(root.iterdir()):
        if path.name.startswith(TMP_PREFIX) and path.is_dir():
            key = path.name.removeprefix(TMP_PREFIX).rsplit("-", 1)[0]  # build_entry's mkdtemp: <prefix><key>-<random>
            if not _build_running(root, key):
                gone.append(path)
        elif path.is_dir() and (path / MANIFEST).is_file():
            try:
                built_by = json.loads((path / MANIFEST).read_text()).get("code")
            except (OSError, ValueError):
                continue  # unreadable: not ours to judge
            if built_by != code and not _build_running(root, path.name):
                gone.append(path)
    if not dry_run:
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
    return gone


_LOADED: dict[tuple[str, int], dict[str, nn.Module]] = {}
"""Models loaded in this process, by (entry directory, manifest mtime)."""


def _resolve(cfg: FeedConfig, progress: bool, cache_dir: str | Path | None, training: RankerTraining | None,
             ) -> tuple[Path, dict[str, nn.Module]]:
    key = cache_key(cfg)
    root = cache_root(cache_dir)
    entry = root / key
    if not _complete(entry):
        with _lock(lock_path(root, key)):
            if not _complete(entry):  # another process may have built it meanwhile
                if entry.exists():
                    raise FileExistsError(f"{entry} is an incomplete learned-ranker cache entry (no {MANIFEST} or a "
                                          "missing checkpoint): delete it to rebuild")
                build_entry(cfg, entry, training or RankerTraining(), progress)
    memo = (str(entry.resolve()), (entry / MANIFEST).stat().st_mtime_ns)
    if memo not in _LOADED:
        verify_entry(entry)
        try:
            _LOADED[memo] = load_models(entry_paths(entry), _expected_meta(cfg, key))
        except RankerCheckpointError as e:
            raise RankerCheckpointError(f"{e}. The cache entry {entry} was not built for this configuration "
                                          f"(preset {cfg.preset!r}, key {key}): delete it to rebuild") from e
    provide_models(cfg, _LOADED[memo])
    return entry, _LOADED[memo]


def ensure_rankers(cfg: FeedConfig, progress: bool = True, cache_dir: str | Path | None = None,
                   training: RankerTraining | None = None) -> dict[str, Path]:
    """The checkpoint paths ``{kind: path}`` of the learned pipeline for ``cfg``, building the cache entry
    first if none matches (see the module docstring). Every checkpoint is loaded and checked, and the models
    are served to every simulator of this world built in this process from now on
    (:func:`envs.learned.provide_models`).

    Args:
        progress: progress bars and a note on stderr when an entry is built.
        cache_dir: the cache root (default: ``$FEEDGYM_CACHE``, else ``~/.cache/feedgym/rankers``).
        training: the budget if an entry is built (default :class:`RankerTraining`).

    Raises:
        RankerCheckpointError: the entry's checkpoints were written for another preset, key or schema, or
            do not match the sha256 its manifest records (a damaged file: delete the entry to rebuild).
    """
    entry, _ = _resolve(cfg, progress, cache_dir, training)
    return entry_paths(entry)


def _build_in_child(cfg: FeedConfig, cache_dir: str | Path | None, training: RankerTraining | None) -> None:
    import torch

    torch.set_num_threads(1)  # like the evaluation's forked workers: the parent's thread pool does not survive a fork
    ensure_rankers(cfg, progress=False, cache_dir=cache_dir, training=training)


def ensure_rankers_all(cfgs: list[FeedConfig], progress: bool = True, cache_dir: str | Path | None = None,
                       training: RankerTraining | None = None, workers: int | None = None) -> list[str]:
    """:func:`ensure_rankers` for every config in ``cfgs`` that serves learned models, building the missing
    entries at once: the first in this process (with ``progress``), each other one in a forked process
    (``workers`` at most, default the CPU count), since a build runs on one core. The entries are those a build
    one after the other makes (a build depends only on its config, its budget and the code). Returns, once every
    entry is built and every config's models are served in this process, the presets whose entries were built; a
    failed child build raises ``RuntimeError`` naming its preset (and its entry stays unbuilt)."""
    import multiprocessing as mp

    root = cache_root(cache_dir)
    todo, seen = [], set()
    for cfg in cfgs:
        key = cache_key(cfg)
        if cfg.pipeline.learned_models and key not in seen and not _complete(root / key):
            todo.append(cfg)
            seen.add(key)
    width = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    children = []
    for cfg in todo[1:width]:
        if progress:
            print(f"feedgym: building the learned rankers of {cfg.preset!r} in a second process (no progress bars)",
                  file=sys.stderr, flush=True)
        child = mp.get_context("fork").Process(target=_build_in_child, args=(cfg, cache_dir, training), daemon=True)
        child.start()
        children.append((cfg, child))
    try:
        for cfg in [*todo[:1], *todo[width:]]:
            ensure_rankers(cfg, progress=progress, cache_dir=cache_dir, training=training)
    finally:
        for _, child in children:
            child.join()
    failed = [cfg.preset for cfg, child in children if child.exitcode != 0]
    if failed:
        raise RuntimeError(f"building the learned rankers of {', '.join(map(repr, failed))} failed in a child "
                           "process (its error is printed above); run again to retry, or build it alone with "
                           "offline_data.provision.ensure_rankers")
    for cfg in cfgs:  # the entries the children built, and those already there, are served here too
        if cfg.pipeline.learned_models:
            _resolve(cfg, progress, cache_dir, training)
    return [cfg.preset for cfg in todo]


def learned_models(cfg: FeedConfig, progress: bool = True, cache_dir: str | Path | None = None,
                   training: RankerTraining | None = None) -> dict[str, nn.Module]:
    """The trained models ``cfg.pipeline`` asks for (``{kind: model}``, eval mode), via :func:`ensure_rankers`
    (so served to this process's simulators of the world from now on too); ``{}`` when it asks for none."""
    kinds = cfg.pipeline.learned_models
    if not kinds:
        return {}
    _, models = _resolve(cfg, progress, cache_dir, training)
    return {k: models[k] for k in kinds}


class ProvisionedEnv:
    """A registered entry point: builds the env class ``cls`` with its arguments after provisioning the learned
    models its config needs (:func:`learned_models`: built once into the cache, then loaded)."""

    def __init__(self, cls: type[FeedEnv] | type[FeedVectorEnv]) -> None:
        self.cls = cls
        self.metadata = cls.metadata  # gymnasium's make reads the entry point's render modes
        self._own = set(inspect.signature(cls).parameters) - {"preset", "config", "overrides"}

    def __call__(self, *args: Any, preset: str = "default", config: FeedConfig | None = None, **kwargs: Any) -> Any:
        own = {k: v for k, v in kwargs.items() if k in self._own}
        cfg = resolve_config(config, preset, {k: v for k, v in kwargs.items() if k not in self._own})
        learned_models(cfg)
        return self.cls(*args, **{**own, "config": cfg})


make_feed_env = ProvisionedEnv(FeedEnv)
"""Entry point of ``feedgym/ForYouFeed-v0``: :class:`envs.feed_env.FeedEnv`, its learned models provisioned."""
make_discrete_feed_env = ProvisionedEnv(DiscreteFeedEnv)
"""Entry point of ``feedgym/ForYouFeedDiscrete-v0``."""
make_feed_vector_env = ProvisionedEnv(FeedVectorEnv)
"""Vector entry point of ``feedgym/ForYouFeed-v0`` (``gym.make_vec(..., vectorization_mode="vector_entry_point")``)."""
make_discrete_feed_vector_env = ProvisionedEnv(DiscreteFeedVectorEnv)
"""Vector entry point of ``feedgym/ForYouFeedDiscrete-v0``."""
