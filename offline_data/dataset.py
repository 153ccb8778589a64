"""Logged datasets on disk: schema, containers, atomic writing and checked loading.

A dataset is a directory::

    <dir>/transitions.npz   one row per (user, request): M rows, episode-major (sorted by episode, step)
    <dir>/impressions.npz   one row per shown video: I rows, sorted by (episode, step, position)
    <dir>/meta.json         sidecar: schema and env versions, env id, preset, full config, seed, git
                            revision, behaviour policy, counts, dims and the sha256 of each data file

``meta.json`` is written last, so a directory without it is an incomplete write. :func:`save_dataset` checks
everything (dtypes, shapes, episode structure, values, strict-JSON meta) before it touches the disk, then
writes the whole dataset into a hidden temporary directory beside ``<dir>`` (each file fsynced) and swaps
it in by renames: the old dataset is first renamed to ``<dir>.stale-<n>`` and removed only once the new
one is in place, so at every instant a complete dataset (old or new) is on disk. A crash between the two
renames leaves the old one at ``<dir>.stale-<n>``; a directory that holds files other than a dataset's is
never removed (it stays at ``<dir>.stale-<n>``).

Loading (:func:`load_dataset`) checks, in order: schema version, env version, ``meta.json`` as a whole
(:func:`validate_meta`: every field the format defines, its type, its known keys and values; a
:class:`MetaError` naming the field), each file's sha256 (a truncated or corrupted file raises
:class:`ChecksumError` naming it), every key's presence, dtype and shape against the schema and the recorded
dims (:class:`SchemaError` naming the key), the episode structure, the values (finite observations and
rewards, actions inside the action space, impressions pointing at existing transitions, behaviour
log-probabilities finite or NaN = unknown: :class:`PropensityError`), what ``meta.json`` says of the tables
(counts, worlds, propensities known for the behaviour policies that log them), and, when the caller passes the
config it expects, that the data were collected on it, with its preset and observation layout
(:class:`ConfigMismatchError` listing the differing fields).

Schema version 2 (dimension letters: M transitions, I impressions, D observation dims, A knobs,
E user-embedding dims):

transitions.npz
    observations (M, D) float32 · actions (M, A) float32 in [-1, 1], or (M,) int64 menu index when
    ``meta["discrete"]`` · knob_actions (M, A) float32 (the knob vector the simulator received) ·
    rewards (M,) float32 · next_observations (M, D) float32 (the true next observation, also at the
    end of an episode) · terminals (M,) bool: the user churned · timeouts (M,) bool: the horizon or
    the max_steps cap was reached · cutoffs (M,) bool: collection stopped while the episode was still
    running (neither terminal nor timeout; treat as a truncation) · behaviour_log_prob (M,) float64:
    log-probability (continuous: log-density) of the logged action under the behaviour policy, NaN
    if unknown · user_id (M,) int64 (the system's user key) · episode_id (M,) int64 · step (M,) int32
    (request index within the episode, from 0) · world (M,) int32 (which of the logged worlds,
    ``meta["collection"]["world_seeds"]``; version 2 added it).
impressions.npz
    transition_index (I,) int64 (row in transitions) · user_id (I,) int64 · episode_id (I,) int64 ·
    step (I,) int32 · position (I,) int32 (slot in the slate, ads included) · video_id (I,) int32 ·
    responses: watch_s, watch_frac (I,) float32; complete, like, share, comment, follow, skip, regret,
    not_interested (I,) bool · features the system saw when serving: topic (I,) int32, creator (I,)
    int32, format (I,) int8, duration_s (I,) float32, impressions (I,) float32 (the video's logged
    impression counter before this request), new_creator (I,) bool, explore (I,) bool (explore slot),
    promoted (I,) bool, user_emb (I, E) float32 (the system's estimate of the user before this request),
    world (I,) int32 (video ids are per world).
Only shown video slots are logged (ad slots and positions after the user left are not).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from envs import DISCRETE_ENV_ID, ENV_ID
from envs.config import ENV_VERSION, FeedConfig
from envs.feed_env import MENU_NAMES
from rankers.config import KNOB_NAMES
from rankers.fileio import atomic_write_with, file_sha256, fsync_dir, stale_path
from rankers.types import Array

SCHEMA_VERSION = 3
"""3: the knob menu is named so in meta.json (``menu_names``; the epsilon-greedy behaviour ``epsilon_menu`` with
``menu_size``), no more "preset", which names the worlds."""
FORMAT_NAME = "feedgym.offline_data"
TRANSITIONS_FILE = "transitions.npz"
IMPRESSIONS_FILE = "impressions.npz"
META_FILE = "meta.json"

RESPONSE_FLOATS: tuple[str, ...] = ("watch_s", "watch_frac")
RESPONSE_FLAGS: tuple[str, ...] = ("complete", "like", "share", "comment", "follow", "skip", "regret",
                                   "not_interested")

# key -> (dtype, shape in dimension letters); "actions" depends on ``discrete``.
TRANSITION_SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    "observations": ("float32", ("M", "D")),
    "actions": ("float32", ("M", "A")),
    "knob_actions": ("float32", ("M", "A")),
    "rewards": ("float32", ("M",)),
    "next_observations": ("float32", ("M", "D")),
    "terminals": ("bool", ("M",)),
    "timeouts": ("bool", ("M",)),
    "cutoffs": ("bool", ("M",)),
    "behaviour_log_prob": ("float64", ("M",)),
    "user_id": ("int64", ("M",)),
    "episode_id": ("int64", ("M",)),
    "step": ("int32", ("M",)),
    "world": ("int32", ("M",)),
}
IMPRESSION_SCHEMA: dict[str, tuple[str, tuple[str, ...]]] = {
    "transition_index": ("int64", ("I",)),
    "user_id": ("int64", ("I",)),
    "episode_id": ("int64", ("I",)),
    "step": ("int32", ("I",)),
    "position": ("int32", ("I",)),
    "video_id": ("int32", ("I",)),
    **{k: ("float32", ("I",)) for k in RESPONSE_FLOATS},
    **{k: ("bool", ("I",)) for k in RESPONSE_FLAGS},
    "topic": ("int32", ("I",)),
    "creator": ("int32", ("I",)),
    "format": ("int8", ("I",)),
    "duration_s": ("float32", ("I",)),
    "impressions": ("float32", ("I",)),
    "new_creator": ("bool", ("I",)),
    "explore": ("bool", ("I",)),
    "promoted": ("bool", ("I",)),
    "user_emb": ("float32", ("I", "E")),
    "world": ("int32", ("I",)),
}


# ---------------------------------------------------------------------------------------------- errors
class DatasetError(ValueError):
    """A logged dataset cannot be used as it is; the message names the file or key and the rule."""


class SchemaVersionError(DatasetError):
    pass


class EnvVersionError(DatasetError):
    pass


class ChecksumError(DatasetError):
    pass


class SchemaError(DatasetError):
    pass


class ConfigMismatchError(DatasetError):
    pass


class MetaError(SchemaError):
    """A ``meta.json`` field is missing, unknown where only known keys belong, or of the wrong type or value."""


class PropensityError(SchemaError):
    """The behaviour policy's logged log-probabilities cannot be propensities (infinite, a probability > 1, or
    unknown for a policy whose propensities are known)."""


# ---------------------------------------------------------------------------------------------- containers
@dataclass(frozen=True)
class Transitions:
    """M logged transitions, episode-major. See the module docstring for each field."""

    observations: Array  # (M, D) float32
    actions: Array  # (M, A) float32 | (M,) int64
    knob_actions: Array  # (M, A) float32
    rewards: Array  # (M,) float32
    next_observations: Array  # (M, D) float32
    terminals: Array  # (M,) bool churn
    timeouts: Array  # (M,) bool horizon / max_steps
    cutoffs: Array  # (M,) bool collection ended mid-episode
    behaviour_log_prob: Array  # (M,) float64, NaN = unknown
    user_id: Array  # (M,) int64
    episode_id: Array  # (M,) int64
    step: Array  # (M,) int32
    world: Array  # (M,) int32 index of the world logged (collect(worlds=K))

    def __len__(self) -> int:
        return int(self.rewards.shape[0])

    def episode_bounds(self) -> tuple[Array, Array]:
        """(starts, ends) int64 row ranges ``[start, end)`` of each episode, in order."""
        m = len(self)
        if m == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        cut = np.flatnonzero(self.episode_id[1:] != self.episode_id[:-1]) + 1
        starts = np.r_[0, cut].astype(np.int64)
        ends = np.r_[cut, m].astype(np.int64)
        return starts, ends


@dataclass(frozen=True)
class Impressions:
    """I logged impressions (shown videos). See the module docstring for each field."""

    transition_index: Array  # (I,) int64
    user_id: Array  # (I,) int64
    episode_id: Array  # (I,) int64
    step: Array  # (I,) int32
    position: Array  # (I,) int32
    video_id: Array  # (I,) int32
    watch_s: Array  # (I,) float32
    watch_frac: Array  # (I,) float32
    complete: Array  # (I,) bool
    like: Array  # (I,) bool
    share: Array  # (I,) bool
    comment: Array  # (I,) bool
    follow: Array  # (I,) bool
    skip: Array  # (I,) bool
    regret: Array  # (I,) bool
    not_interested: Array  # (I,) bool
    topic: Array  # (I,) int32
    creator: Array  # (I,) int32
    format: Array  # (I,) int8
    duration_s: Array  # (I,) float32
    impressions: Array  # (I,) float32 logged counter before the request
    new_creator: Array  # (I,) bool
    explore: Array  # (I,) bool
    promoted: Array  # (I,) bool
    user_emb: Array  # (I, E) float32
    world: Array  # (I,) int32

    def __len__(self) -> int:
        return int(self.video_id.shape[0])


@dataclass(frozen=True)
class LoggedDataset:
    """A logged dataset: its sidecar ``meta`` and both tables."""

    meta: dict[str, Any]
    transitions: Transitions
    impressions: Impressions

    @property
    def discrete(self) -> bool:
        return bool(self.meta["discrete"])


def _arrays(obj: Any) -> dict[str, Array]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


# ---------------------------------------------------------------------------------------------- helpers
def config_to_json(cfg: FeedConfig) -> dict[str, Any]:
    """The full config as JSON types (tuples become lists), as stored in ``meta["config"]``."""
    return cfg.to_json()


def git_revision() -> dict[str, Any]:
    """``{"revision": sha or "unknown", "dirty": bool | None}`` for the repository holding this package."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=True).stdout.strip()
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                            text=True, timeout=10, check=True).stdout
        return {"revision": rev or "unknown", "dirty": bool(st.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": "unknown", "dirty": None}


def dims_of(tr: Transitions, imp: Impressions) -> dict[str, int]:
    """The dimension letters of both tables, read off the arrays (:class:`SchemaError` naming the key if one
    is not an array of the right rank to read a dimension from)."""
    for table, obj, key, ndim in (("transitions", tr, "rewards", 1), ("transitions", tr, "observations", 2),
                                  ("transitions", tr, "knob_actions", 2), ("impressions", imp, "video_id", 1),
                                  ("impressions", imp, "user_emb", 2)):
        a = getattr(obj, key)
        if not isinstance(a, np.ndarray) or a.ndim != ndim:
            got = f"shape {a.shape}" if isinstance(a, np.ndarray) else f"type {type(a).__name__}"
            raise SchemaError(f"{table}: key {key!r} has {got}, expected a {ndim}-d numpy array")
    return {"M": len(tr), "I": len(imp), "D": int(tr.observations.shape[1]), "A": int(tr.knob_actions.shape[1]),
            "E": int(imp.user_emb.shape[1])}


# ---------------------------------------------------------------------------------------------- validation
def _schema(table: str, discrete: bool) -> dict[str, tuple[str, tuple[str, ...]]]:
    if table == "impressions":
        return IMPRESSION_SCHEMA
    s = dict(TRANSITION_SCHEMA)
    if discrete:
        s["actions"] = ("int64", ("M",))
    return s


def validate_arrays(table: str, arrays: dict[str, Array], dims: dict[str, int], discrete: bool,
                    source: str = "") -> None:
    """Raises :class:`SchemaError` naming the key if one is missing or has the wrong dtype or shape."""
    where = f" in {source}" if source else ""
    for key, (dtype, shape) in _schema(table, discrete).items():
        if key not in arrays:
            raise SchemaError(f"{table}: missing key {key!r}{where}")
        a = arrays[key]
        if not isinstance(a, np.ndarray):
            raise SchemaError(f"{table}: key {key!r}{where} is a {type(a).__name__}, expected a numpy array")
        want = tuple(dims[d] for d in shape)
        if a.shape != want:
            raise SchemaError(f"{table}: key {key!r}{where} has shape {a.shape}, expected {want} "
                              f"({', '.join(shape)}; dims {dims})")
        if a.dtype != np.dtype(dtype):
            raise SchemaError(f"{table}: key {key!r}{where} has dtype {a.dtype}, expected {dtype}")


def validate_episodes(tr: Transitions) -> None:
    """Each episode is contiguous, its steps run 0..T-1, and exactly its last row ends it (terminal,
    timeout or cutoff); terminal and timeout are never both set."""
    if np.any(tr.terminals & tr.timeouts):
        raise SchemaError("transitions: 'terminals' and 'timeouts' overlap (must be exclusive)")
    end_flags = tr.terminals.astype(np.int64) + tr.timeouts + tr.cutoffs
    if np.any(end_flags > 1):
        raise SchemaError("transitions: a row has more than one of terminals/timeouts/cutoffs set")
    starts, ends = tr.episode_bounds()
    if np.unique(tr.episode_id[starts]).size != starts.size:
        raise SchemaError("transitions: 'episode_id' rows are not contiguous per episode")
    is_last = np.zeros(len(tr), bool)
    is_last[ends - 1] = True
    if np.any((end_flags > 0) != is_last):
        bad = int(np.flatnonzero((end_flags > 0) != is_last)[0])
        raise SchemaError(f"transitions: episode end flags do not match episode boundaries (row {bad}, "
                          f"episode {int(tr.episode_id[bad])})")
    lengths = ends - starts
    expect = np.arange(len(tr)) - np.repeat(starts, lengths)
    if not np.array_equal(tr.step, expect):
        raise SchemaError("transitions: 'step' does not count 0..T-1 within each episode")


def _first_bad(table: str, key: str, a: Array, bad: Array, rule: str, where: str) -> None:
    """Raises :class:`SchemaError` naming ``key``, its first offending row and value, if ``bad`` has any."""
    if np.any(bad):
        idx = np.argwhere(bad)[0]
        row = int(idx[0])
        value = a[tuple(idx)] if a.ndim == bad.ndim else a[row]
        raise SchemaError(f"{table}: key {key!r}{where} has value {value.item()!r} at row {row} "
                          f"({int(np.count_nonzero(bad))} such entries): {rule}")


def validate_values(tr: Transitions, imp: Impressions, discrete: bool, n_actions: int, source: str = "") -> None:
    """Raises :class:`SchemaError` naming the key, row and value if a value is outside its domain: observations,
    next observations and rewards must be finite, continuous actions and knob vectors finite and in [-1, 1],
    discrete actions menu indices in [0, n_actions), impressions' ``transition_index`` a row of the
    transitions. (Dtypes and shapes are checked first, by :func:`validate_arrays`.)"""
    where = f" in {source}" if source else ""
    for key in ("observations", "next_observations", "rewards"):
        a = getattr(tr, key)
        _first_bad("transitions", key, a, ~np.isfinite(a), "must be finite", where)
    knob_keys = ("knob_actions",) if discrete else ("actions", "knob_actions")
    for key in knob_keys:
        a = getattr(tr, key)
        _first_bad("transitions", key, a, ~(np.abs(a) <= 1.0), "must be finite and in [-1, 1] (the action space)",
                   where)
    if discrete:
        a = tr.actions
        _first_bad("transitions", "actions", a, (a < 0) | (a >= n_actions),
                   f"discrete actions are menu indices in [0, {n_actions})", where)
    ti = imp.transition_index
    _first_bad("impressions", "transition_index", ti, (ti < 0) | (ti >= len(tr)),
               f"must be a transition row in [0, {len(tr)})", where)
    lp = tr.behaviour_log_prob
    try:
        _first_bad("transitions", "behaviour_log_prob", lp, np.isinf(lp),
                   "a log-probability must be finite (NaN = unknown)", where)
        if discrete:  # a probability, not a density: at most 1
            _first_bad("transitions", "behaviour_log_prob", lp, lp > 1e-9,
                       "a discrete action's log-probability must be <= 0", where)
    except SchemaError as e:
        raise PropensityError(str(e)) from None


def _json_problem(v: Any, field: str) -> str | None:
    """Where and why ``v`` is not strict JSON (None if it is): the dotted field path and the value."""
    if v is None or isinstance(v, (bool, str, int)):
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else f"{field} is {v!r} (JSON has no NaN or infinity)"
    if isinstance(v, dict):
        for k, x in v.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return f"{field} has a key {k!r} of type {type(k).__name__} (JSON keys are strings)"
            if (why := _json_problem(x, f"{field}.{k}" if field else str(k))) is not None:
                return why
        return None
    if isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            if (why := _json_problem(x, f"{field}[{i}]")) is not None:
                return why
        return None
    return f"{field} is {v!r} of type {type(v).__name__}, which JSON cannot hold (use int, float, str, list, dict)"


def meta_to_json(meta: dict[str, Any], what: str = "meta") -> str:
    """``meta`` as strict JSON text (``allow_nan=False``); :class:`SchemaError` naming the field and value that
    JSON cannot hold (NaN, infinity, a numpy scalar, an object)."""
    try:
        return json.dumps(meta, indent=2, sort_keys=False, allow_nan=False) + "\n"
    except (TypeError, ValueError, RecursionError) as e:
        why = _json_problem(meta, "") or str(e)
        raise SchemaError(f"{what}: {why}; {META_FILE} is strict JSON") from e


META_KEYS: tuple[str, ...] = ("format", "schema_version", "env_id", "env_version", "preset", "config", "seed",
                              "discrete", "behaviour", "git", "collection", "counts", "knob_names", "menu_names",
                              "observation_names", "dims", "files")
"""The keys of ``meta.json`` the format defines, all required (:func:`validate_meta`). Other top-level keys are
the writer's own notes (``collect(extra_meta=...)``, e.g. ``script``): any strict JSON."""
COLLECTION_KEYS: tuple[str, ...] = ("n_users", "n_steps", "steps_run", "autoreset", "policy_stream", "worlds",
                                    "world_seeds", "world_users", "world_steps_run")
COUNT_KEYS: tuple[str, ...] = ("transitions", "impressions", "episodes", "users", "terminals", "timeouts", "cutoffs")
BEHAVIOUR_KEYS: dict[str, tuple[str, ...]] = {
    "gaussian_knobs": ("kind", "discrete", "sigma", "mean", "distribution"),
    "epsilon_menu": ("kind", "discrete", "epsilon", "menu_size", "probs"),
    "callable": ("kind", "discrete", "name", "log_prob"),
}
"""The keys of ``meta["behaviour"]`` for the behaviour policies of ``offline_data.policies``; another kind (a
policy of one's own) needs ``kind`` and ``discrete`` only."""
KNOWN_PROPENSITIES: tuple[str, ...] = ("gaussian_knobs", "epsilon_menu")
"""Behaviour kinds that log every action's log-probability (none may be NaN)."""


class _Meta:
    """Checks of ``meta.json``'s fields, each raising :class:`MetaError` that names the field."""

    def __init__(self, where: str | Path) -> None:
        self.where = where

    def fail(self, field: str, why: str) -> None:
        raise MetaError(f"{self.where}: {field!r} {why}")

    def obj(self, v: Any, field: str, keys: tuple[str, ...] | None = None) -> dict[str, Any]:
        """``v`` as an object; with ``keys``, exactly those keys."""
        if not isinstance(v, dict):
            self.fail(field, f"is a {type(v).__name__}, expected an object"
                      + (f" with keys {list(keys)}" if keys else ""))
        if keys is not None:
            missing = [k for k in keys if k not in v]
            if missing:
                self.fail(field, f"is missing {missing[0]!r} (expected keys {list(keys)}; got {sorted(v)})")
            unknown = sorted(set(v) - set(keys))
            if unknown:
                self.fail(field, f"has unknown key {unknown[0]!r} (known keys: {list(keys)})")
        return v

    def int_(self, v: Any, field: str, lo: int = 0, none: bool = False) -> int | None:
        if none and v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            self.fail(field, f"is {v!r}, expected an integer >= {lo}" + (" or null" if none else ""))
        return v

    def num(self, v: Any, field: str, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False) -> float:
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
        if not ok or v > hi or v < lo or (lo_open and v == lo):
            rule = (f" in [{lo:g}, {hi:g}]" if math.isfinite(lo) and math.isfinite(hi) and not lo_open
                    else f" > {lo:g}" if lo_open else f" >= {lo:g}" if math.isfinite(lo) else "")
            self.fail(field, f"is {v!r}, expected a finite number{rule}")
        return float(v)

    def str_(self, v: Any, field: str) -> str:
        if not isinstance(v, str):
            self.fail(field, f"is {v!r}, expected a string")
        return v

    def bool_(self, v: Any, field: str, none: bool = False) -> bool | None:
        if not (isinstance(v, bool) or (none and v is None)):
            self.fail(field, f"is {v!r}, expected a JSON boolean (true or false){' or null' if none else ''}")
        return v

    def list_(self, v: Any, field: str, n: int | None = None, of: str = "item") -> list[Any]:
        if not isinstance(v, list):
            self.fail(field, f"is {v!r}, expected a list of {of}s")
        if n is not None and len(v) != n:
            self.fail(field, f"has {len(v)} entries, expected {n}")
        return v

    def names(self, v: Any, field: str, n: int | None = None) -> list[str]:
        if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v) or len(set(v)) != len(v):
            self.fail(field, f"is {v!r}, expected a non-empty list of distinct strings")
        return self.list_(v, field, n, "string")


def validate_meta(meta: Any, where: str | Path, *, written: bool = True) -> None:
    """Checks ``meta.json`` as a whole; raises :class:`MetaError` (a :class:`SchemaError`) naming the field that
    is missing or wrong, :class:`EnvVersionError` for another env version.

    Every key of :data:`META_KEYS` is required and checked: ``format`` and ``schema_version`` (this format's),
    ``env_version`` (this code's), ``env_id`` (the registered id of the action type), ``discrete`` (a JSON
    boolean), ``config`` (an object that makes a valid :class:`FeedConfig`) and ``preset`` (a string equal to the
    config's), ``seed`` (an integer >= 0), ``behaviour`` (an object: ``kind``, ``discrete`` equal to the
    dataset's, and for the policies of ``offline_data.policies`` exactly their keys with finite values:
    sigma > 0, mean in [-1, 1], epsilon in [0, 1], probabilities that sum to 1), ``git`` (``revision``, ``dirty``),
    ``collection`` (exactly :data:`COLLECTION_KEYS`, one entry per world in the per-world lists), ``counts``
    (exactly :data:`COUNT_KEYS`, agreeing with ``dims``), ``knob_names`` (this code's knobs), ``menu_names``
    and ``observation_names`` (distinct strings, D of them), ``dims`` (exactly M, I, D, A, E, integers >= 0;
    A knobs, E the config's embedding size) and ``files`` (a ``sha256`` and ``bytes`` per data file; the
    checksum a 64-digit hex string once ``written``). Other top-level keys are the writer's notes."""
    if not isinstance(meta, dict):
        raise MetaError(f"{where}: meta is a {type(meta).__name__}, expected a JSON object")
    c = _Meta(where)
    for key in META_KEYS:
        if key not in meta:
            c.fail(key, f"is missing (a dataset's meta.json has the keys {list(META_KEYS)})")
    if meta["format"] != FORMAT_NAME:
        c.fail("format", f"is {meta['format']!r}, expected {FORMAT_NAME!r}")
    if meta["schema_version"] != SCHEMA_VERSION:
        raise SchemaVersionError(f"{where}: schema version {meta['schema_version']!r}; this code reads schema "
                                 f"version {SCHEMA_VERSION}")
    if meta["env_version"] != ENV_VERSION:
        raise EnvVersionError(f"{where}: env version {meta['env_version']!r}; this code's environment is "
                              f"{ENV_VERSION!r} (dynamics differ: recollect, or check out a matching revision)")
    discrete = bool(c.bool_(meta["discrete"], "discrete"))
    env_id = DISCRETE_ENV_ID if discrete else ENV_ID
    if meta["env_id"] != env_id:
        c.fail("env_id", f"is {meta['env_id']!r}, expected {env_id!r} (the env of "
               f"{'discrete' if discrete else 'continuous'} actions)")
    config = c.obj(meta["config"], "config")
    try:
        cfg = FeedConfig.from_json(config)
    except (ValueError, TypeError) as e:
        raise MetaError(f"{where}: 'config' is not a valid config: {e}") from None
    if c.str_(meta["preset"], "preset") != cfg.preset:
        c.fail("preset", f"is {meta['preset']!r}, but 'config.preset' is {cfg.preset!r}")
    c.int_(meta["seed"], "seed")

    dims = c.obj(meta["dims"], "dims", ("M", "I", "D", "A", "E"))
    for d in ("M", "I", "D", "A", "E"):
        c.int_(dims[d], f"dims.{d}")
    if dims["A"] != len(KNOB_NAMES):
        c.fail("dims.A", f"is {dims['A']}, expected {len(KNOB_NAMES)} (the knobs)")
    if dims["E"] != cfg.corpus.emb_dim:
        c.fail("dims.E", f"is {dims['E']}, expected the config's corpus.emb_dim ({cfg.corpus.emb_dim})")
    files = c.obj(meta["files"], "files", (TRANSITIONS_FILE, IMPRESSIONS_FILE))
    for name in (TRANSITIONS_FILE, IMPRESSIONS_FILE):
        entry = files[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            c.fail(f"files.{name}", f"is {entry!r}: no sha256 checksum recorded for {name!r}")
        c.obj(entry, f"files.{name}", ("sha256", "bytes"))
        c.int_(entry["bytes"], f"files.{name}.bytes")
        sha = entry["sha256"]
        if written and (len(sha) != 64 or any(ch not in "0123456789abcdef" for ch in sha)):
            c.fail(f"files.{name}.sha256", f"is {sha!r}, expected 64 lowercase hex digits")

    knobs = c.names(meta["knob_names"], "knob_names")
    if knobs != list(KNOB_NAMES):
        c.fail("knob_names", f"is {knobs}, but this code's knobs are {list(KNOB_NAMES)} (the action columns would "
               "be read as other knobs)")
    menu = c.names(meta["menu_names"], "menu_names")
    c.names(meta["observation_names"], "observation_names", dims["D"])

    b = c.obj(meta["behaviour"], "behaviour")
    kind = c.str_(b.get("kind"), "behaviour.kind")
    if c.bool_(b.get("discrete"), "behaviour.discrete") != discrete:
        c.fail("behaviour.discrete", f"is {b['discrete']!r}, but the dataset's 'discrete' is {discrete!r}")
    if kind in BEHAVIOUR_KEYS:
        c.obj(b, "behaviour", BEHAVIOUR_KEYS[kind])
    if kind == "gaussian_knobs":
        for i, v in enumerate(c.list_(b["sigma"], "behaviour.sigma", dims["A"], "number")):
            c.num(v, f"behaviour.sigma[{i}]", 0.0, lo_open=True)
        for i, v in enumerate(c.list_(b["mean"], "behaviour.mean", dims["A"], "number")):
            c.num(v, f"behaviour.mean[{i}]", -1.0, 1.0)
        c.str_(b["distribution"], "behaviour.distribution")
    elif kind == "epsilon_menu":
        c.num(b["epsilon"], "behaviour.epsilon", 0.0, 1.0)
        n = c.int_(b["menu_size"], "behaviour.menu_size", 1)
        if n is not None and n > len(menu):
            c.fail("behaviour.menu_size", f"is {n}, more than the {len(menu)} entries of 'menu_names'")
        probs = [c.num(v, f"behaviour.probs[{i}]", 0.0, 1.0)
                 for i, v in enumerate(c.list_(b["probs"], "behaviour.probs", n, "number"))]
        if abs(math.fsum(probs) - 1.0) > 1e-9:
            c.fail("behaviour.probs", f"sum to {math.fsum(probs)!r}, expected 1")
    elif kind == "callable":
        c.str_(b["name"], "behaviour.name")
        c.str_(b["log_prob"], "behaviour.log_prob")

    git = c.obj(meta["git"], "git", ("revision", "dirty"))
    c.str_(git["revision"], "git.revision")
    c.bool_(git["dirty"], "git.dirty", none=True)

    col = c.obj(meta["collection"], "collection", COLLECTION_KEYS)
    n_users = c.int_(col["n_users"], "collection.n_users", 1)
    c.int_(col["n_steps"], "collection.n_steps", 1, none=True)
    steps_run = c.int_(col["steps_run"], "collection.steps_run")
    c.bool_(col["autoreset"], "collection.autoreset")
    c.int_(col["policy_stream"], "collection.policy_stream")
    worlds = c.int_(col["worlds"], "collection.worlds", 1)
    for key in ("world_seeds", "world_users", "world_steps_run"):
        for i, v in enumerate(c.list_(col[key], f"collection.{key}", worlds, "integer")):
            c.int_(v, f"collection.{key}[{i}]", 1 if key == "world_users" else 0)
    if sum(col["world_users"]) != n_users:
        c.fail("collection.world_users", f"sum to {sum(col['world_users'])}, expected n_users={n_users}")
    if max(col["world_steps_run"]) != steps_run:
        c.fail("collection.steps_run", f"is {steps_run}, expected the most steps a world ran "
               f"({max(col['world_steps_run'])})")

    counts = c.obj(meta["counts"], "counts", COUNT_KEYS)
    for key in COUNT_KEYS:
        c.int_(counts[key], f"counts.{key}")
    for key, d in (("transitions", "M"), ("impressions", "I")):
        if counts[key] != dims[d]:
            c.fail(f"counts.{key}", f"is {counts[key]}, but 'dims.{d}' is {dims[d]}")


def validate_meta_against_data(meta: dict[str, Any], tr: Transitions, imp: Impressions, source: str = "") -> None:
    """The parts of ``meta`` the arrays can confirm: ``counts`` equal the tables' own, ``world`` columns name one
    of ``collection.worlds``, and a behaviour policy of :data:`KNOWN_PROPENSITIES` logged every action's
    log-probability (:class:`MetaError`, :class:`PropensityError`)."""
    where = f" in {source}" if source else ""
    got = counts_of(tr, imp)
    for key in COUNT_KEYS:
        if meta["counts"][key] != got[key]:
            raise MetaError(f"meta 'counts.{key}'{where} is {meta['counts'][key]}, but the tables hold {got[key]}")
    worlds = meta["collection"]["worlds"]
    for table, a in (("transitions", tr.world), ("impressions", imp.world)):
        _first_bad(table, "world", a, (a < 0) | (a >= worlds), f"must be a world index in [0, {worlds}) "
                   "(meta 'collection.worlds')", where)
    kind = meta["behaviour"]["kind"]
    if kind in KNOWN_PROPENSITIES and np.isnan(tr.behaviour_log_prob).any():
        try:
            _first_bad("transitions", "behaviour_log_prob", tr.behaviour_log_prob, np.isnan(tr.behaviour_log_prob),
                       f"behaviour {kind!r} logs every action's log-probability (NaN = unknown)", where)
        except SchemaError as e:
            raise PropensityError(str(e)) from None


def _n_actions(meta: dict[str, Any]) -> int:
    """The size of the discrete action space the data were logged on (the knob menu)."""
    return len(meta.get("menu_names", MENU_NAMES))


def check_config(meta: dict[str, Any], expected: FeedConfig, source: str = "") -> None:
    """Raises :class:`ConfigMismatchError` if ``meta`` was collected on another config than ``expected``."""
    diff = expected.differences(meta.get("config", {}))
    if not diff and meta.get("preset") != expected.preset:
        diff = f"preset: stored={meta.get('preset')!r} here={expected.preset!r}"
    if not diff:
        from envs.observation import ObservationLayout

        names = ObservationLayout(expected).names
        if meta.get("observation_names") != names:
            diff = f"observation_names: stored={meta.get('observation_names')} here={names}"
    if diff:
        raise ConfigMismatchError(f"dataset {source} was collected on preset {meta.get('preset')!r} with a different "
                                  f"config than expected (preset {expected.preset!r}): {diff}")


# ---------------------------------------------------------------------------------------------- save / load
def check_save_target(path: str | Path, overwrite: bool = False) -> Path:
    """Raises before any work if :func:`save_dataset` would refuse ``path``: it already holds a dataset and
    ``overwrite`` is False (``FileExistsError``), it is not a directory, or it is a non-empty directory
    without a dataset's ``meta.json`` that holds files other than a dataset's (``FileExistsError``: it is
    not ours to replace; with ``overwrite`` it is moved to ``<path>.stale-<n>``, never deleted)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory: a dataset is a directory")
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({META_FILE} exists); pass overwrite=True")
    if out.is_dir() and not overwrite and not (out / META_FILE).exists():
        foreign = _foreign_files(out)
        if foreign:
            raise FileExistsError(f"{out} is not a dataset directory (no {META_FILE}) and holds other files "
                                  f"{foreign[:5]}; choose another path, or pass overwrite=True to move it to "
                                  f"{stale_path(out).name}")
    return out


def _foreign_files(out: Path) -> list[str]:
    """Entries of ``out`` that are not a dataset's files (nor the temporary files their writes leave)."""
    ours = (TRANSITIONS_FILE, IMPRESSIONS_FILE, META_FILE)
    return sorted(p.name for p in out.iterdir()
                  if not (p.is_file() and (p.name in ours or (p.name.startswith(tuple(f".{n}." for n in ours))
                                                                and p.name.endswith(".tmp")))))


def save_dataset(ds: LoggedDataset, path: str | Path, overwrite: bool = False, compress: bool = True) -> Path:
    """Writes ``ds`` to directory ``path`` (its parent is created if needed); fills in dims, counts and checksums.

    Everything is checked first (schema, dtypes, shapes, episode structure, values, the meta fields loading
    needs, strict JSON): bad input raises :class:`DatasetError` and leaves ``path`` as it was. The files are
    then written into a temporary directory beside ``path`` and swapped in by renames, so a failure or crash
    at any point leaves the old dataset (at ``path``, or at ``<path>.stale-<n>`` between the two renames)
    or the new one complete. The replaced directory is removed once the new one is in place unless it holds
    files other than a dataset's (then it stays at ``<path>.stale-<n>``).

    Raises ``FileExistsError`` if ``path`` already holds a dataset and ``overwrite`` is False (see
    :func:`check_save_target`).
    """
    out = check_save_target(path, overwrite)
    tr, imp = ds.transitions, ds.impressions
    meta = dict(ds.meta)
    meta.setdefault("env_version", ENV_VERSION)
    dims = dims_of(tr, imp)
    meta.update(format=FORMAT_NAME, schema_version=SCHEMA_VERSION, dims=dims,
                files={n: {"sha256": "", "bytes": 0} for n in (TRANSITIONS_FILE, IMPRESSIONS_FILE)})
    meta_to_json(meta)  # NaN, infinity, a numpy scalar: named before the fields are checked
    validate_meta(meta, "meta", written=False)
    discrete = bool(meta["discrete"])
    validate_arrays("transitions", _arrays(tr), dims, discrete)
    validate_arrays("impressions", _arrays(imp), dims, discrete)
    validate_episodes(tr)
    validate_values(tr, imp, discrete, _n_actions(meta))
    validate_meta_against_data(meta, tr, imp)
    meta_to_json(meta)  # the complete meta differs only by checksums: it will serialise too

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    old: Path | None = None
    try:
        files = {}
        for name, obj in ((TRANSITIONS_FILE, tr), (IMPRESSIONS_FILE, imp)):
            arrays = _arrays(obj)

            def write(f: IO[bytes], a: dict[str, Array] = arrays) -> None:
                # numpy's stub lets a **dict fill the allow_pickle flag; the column names never include it
                (np.savez_compressed if compress else np.savez)(f, **a)  # type: ignore[arg-type]

            atomic_write_with(tmp / name, write)
            files[name] = {"sha256": file_sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
        meta["files"] = files
        text = meta_to_json(meta)
        atomic_write_with(tmp / META_FILE, lambda f: f.write(text.encode()))
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        elif out.exists():
            old = stale_path(out)
            os.rename(out, old)  # the old dataset stays complete, under another name, until the new one is in
        os.rename(tmp, out)
        fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)  # put the old dataset back
        raise
    if old is not None and not _foreign_files(old):
        shutil.rmtree(old, ignore_errors=True)
    return out


def read_dataset_meta(path: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of dataset directory ``path`` (no other checks)."""
    p = Path(path) / META_FILE
    if not p.exists():
        stale = sorted(q.name for q in Path(path).parent.glob(f"{Path(path).name}.stale-*"))
        hint = f"; set-aside copies beside it: {stale}" if stale else ""
        raise DatasetError(f"{p} not found: {path} is not a complete dataset (meta.json is written last){hint}")
    if not p.is_file():
        raise DatasetError(f"{p} is not a regular file: {path} is not a readable dataset")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p} is not valid JSON: {e}") from e
    except OSError as e:
        raise DatasetError(f"{p} cannot be read: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{p} does not hold a JSON object")
    return meta


def _load_npz(path: Path, expected_sha: str | None) -> dict[str, Array]:
    if not path.exists():
        raise DatasetError(f"data file {path} is missing")
    got = file_sha256(path) if expected_sha is not None else None
    if got is not None and got != expected_sha:
        raise ChecksumError(f"data file {path} is corrupt or truncated: sha256 {got[:16]}... does not match "
                            f"{str(expected_sha)[:16]}... recorded in {META_FILE}")
    try:
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise DatasetError(f"data file {path} cannot be read: {e}") from e


def load_dataset(path: str | Path, expected_config: FeedConfig | None = None, *,
                 expected_discrete: bool | None = None, verify_checksums: bool = True) -> LoggedDataset:
    """Loads and checks a dataset directory (see the module docstring for the checks and errors).

    Args:
        path: the dataset directory.
        expected_config: if given, the data must have been collected on exactly this config.
        expected_discrete: if given, the data must have discrete (True) or continuous (False) actions.
        verify_checksums: compare each file's sha256 with ``meta.json`` (on by default).
    """
    root = Path(path)
    meta = read_dataset_meta(root)
    sv = meta.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise SchemaVersionError(f"dataset {root} has schema version {sv!r}; this code reads schema version "
                                 f"{SCHEMA_VERSION}")
    ev = meta.get("env_version")
    if ev != ENV_VERSION:
        raise EnvVersionError(f"dataset {root} was collected with env version {ev!r}; this code's environment is "
                              f"{ENV_VERSION!r} (dynamics differ: recollect, or check out a matching revision)")
    validate_meta(meta, root / META_FILE)
    if expected_discrete is not None and bool(meta["discrete"]) != expected_discrete:
        raise ConfigMismatchError(f"dataset {root} has {'discrete' if meta['discrete'] else 'continuous'} actions, "
                                  f"expected {'discrete' if expected_discrete else 'continuous'}")
    if expected_config is not None:
        check_config(meta, expected_config, str(root))
    dims = {k: meta["dims"][k] for k in ("M", "I", "D", "A", "E")}
    tables: dict[str, dict[str, Array]] = {}
    for table, name in (("transitions", TRANSITIONS_FILE), ("impressions", IMPRESSIONS_FILE)):
        entry = meta["files"][name]
        arrays = _load_npz(root / name, entry["sha256"] if verify_checksums else None)
        validate_arrays(table, arrays, dims, bool(meta["discrete"]), source=str(root / name))
        tables[table] = arrays
    tr = Transitions(**{k: tables["transitions"][k] for k in TRANSITION_SCHEMA})
    imp = Impressions(**{k: tables["impressions"][k] for k in IMPRESSION_SCHEMA})
    validate_episodes(tr)
    validate_values(tr, imp, bool(meta["discrete"]), _n_actions(meta), source=str(root))
    validate_meta_against_data(meta, tr, imp, source=str(root))
    return LoggedDataset(meta=meta, transitions=tr, impressions=imp)


# ---------------------------------------------------------------------------------------------- selection
def select_episodes(ds: LoggedDataset, keep: Array) -> LoggedDataset:
    """The dataset restricted to transitions whose episode is in ``keep`` (episode ids); impressions
    follow and their ``transition_index`` is renumbered. ``meta`` counts are updated."""
    tr, imp = ds.transitions, ds.impressions
    rows = np.isin(tr.episode_id, keep)
    new_index = np.cumsum(rows) - 1
    irows = rows[imp.transition_index]
    t2 = Transitions(**{k: v[rows] for k, v in _arrays(tr).items()})
    i_arr = {k: v[irows] for k, v in _arrays(imp).items()}
    i_arr["transition_index"] = new_index[imp.transition_index[irows]].astype(np.int64)
    meta = dict(ds.meta)
    meta["counts"] = counts_of(t2, Impressions(**i_arr))
    return LoggedDataset(meta=meta, transitions=t2, impressions=Impressions(**i_arr))


def split_by_user(ds: LoggedDataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[LoggedDataset, LoggedDataset]:
    """(train, validation) split by user id, never by transition."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    users = np.unique(ds.transitions.user_id)
    rng = np.random.default_rng(seed)
    n_val = max(1, round(val_fraction * users.size)) if users.size > 1 else 0
    val_users = rng.permutation(users)[:n_val]
    is_val = np.isin(ds.transitions.user_id, val_users)
    eps_val = np.unique(ds.transitions.episode_id[is_val])
    eps_tr = np.unique(ds.transitions.episode_id[~is_val])
    return select_episodes(ds, eps_tr), select_episodes(ds, eps_val)


def counts_of(tr: Transitions, imp: Impressions) -> dict[str, int]:
    return {"transitions": len(tr), "impressions": len(imp), "episodes": int(np.unique(tr.episode_id).size),
            "users": int(np.unique(tr.user_id).size), "terminals": int(tr.terminals.sum()),
            "timeouts": int(tr.timeouts.sum()), "cutoffs": int(tr.cutoffs.sum())}
