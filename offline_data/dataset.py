"""Logged datasets on disk: schema, containers, atomic writing and checked loading.

A dataset is a directory::

    <dir>/transitions.npz   one row per (user, request): M rows, episode-major (sorted by episode, step)
    <dir>/impressions.npz   one row per shown video: I rows, sorted by (episode, step, position)
    <dir>/meta.json         sidecar: schema and env versions, env id, preset, full config, seed, git
                            revision, behaviour policy, counts, dims and the sha256 of each data file

``meta.json`` is written last, so a directory without it is an incomplete write. Every file is written
to a temporary file in the same directory, fsynced, then ``os.replace``d into place.

Loading (:func:`load_dataset`) checks, in order: schema version, env version, each file's sha256
(a truncated or corrupted file raises :class:`ChecksumError` naming it), every key's presence, dtype and
shape against the schema and the recorded dims (:class:`SchemaError` naming the key), the episode
structure, and, when the caller passes the config it expects, that the data were collected on it
(:class:`ConfigMismatchError` listing the differing fields).

Schema version 2 (dimension letters: M transitions, I impressions, D observation dims, A knobs,
E user-embedding dims):

transitions.npz
    observations (M, D) float32 · actions (M, A) float32 in [-1, 1], or (M,) int64 preset index when
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
import hashlib
import json
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from envs.config import ENV_VERSION, FeedConfig
from rankers.fileio import atomic_write_with
from rankers.types import Array

SCHEMA_VERSION = 2
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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def dims_of(tr: Transitions, imp: Impressions) -> dict[str, int]:
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


def check_config(meta: dict[str, Any], expected: FeedConfig, source: str = "") -> None:
    """Raises :class:`ConfigMismatchError` if ``meta`` was collected on another config than ``expected``."""
    diff = expected.differences(meta.get("config", {}))
    if diff:
        raise ConfigMismatchError(f"dataset {source} was collected on preset {meta.get('preset')!r} with a different "
                                  f"config than expected (preset {expected.preset!r}): {diff}")


# ---------------------------------------------------------------------------------------------- save / load
def save_dataset(ds: LoggedDataset, path: str | Path, overwrite: bool = False, compress: bool = True) -> Path:
    """Writes ``ds`` to directory ``path`` (created if needed); fills in dims, counts and checksums.

    Raises ``FileExistsError`` if ``path`` already holds a dataset and ``overwrite`` is False.
    """
    out = Path(path)
    if (out / META_FILE).exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset ({META_FILE} exists); pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    if (out / META_FILE).exists():
        (out / META_FILE).unlink()  # the old sidecar must not vouch for half-replaced files
    tr, imp = ds.transitions, ds.impressions
    dims = dims_of(tr, imp)
    validate_arrays("transitions", _arrays(tr), dims, ds.discrete)
    validate_arrays("impressions", _arrays(imp), dims, ds.discrete)
    validate_episodes(tr)
    files = {}
    for name, obj in ((TRANSITIONS_FILE, tr), (IMPRESSIONS_FILE, imp)):
        arrays = _arrays(obj)

        def write(f: IO[bytes], a: dict[str, Array] = arrays) -> None:
            (np.savez_compressed if compress else np.savez)(f, **a)  # type: ignore[arg-type]

        atomic_write_with(out / name, write)
        files[name] = {"sha256": sha256_file(out / name), "bytes": (out / name).stat().st_size}
    meta = dict(ds.meta)
    meta.update(format=FORMAT_NAME, schema_version=SCHEMA_VERSION, dims=dims, files=files)
    meta.setdefault("env_version", ENV_VERSION)
    text = json.dumps(meta, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_with(out / META_FILE, lambda f: f.write(text.encode()))
    return out


def read_meta(path: str | Path) -> dict[str, Any]:
    """The parsed ``meta.json`` of dataset directory ``path`` (no other checks)."""
    p = Path(path) / META_FILE
    if not p.exists():
        raise DatasetError(f"{p} not found: {path} is not a complete dataset (meta.json is written last)")
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(meta, dict):
        raise DatasetError(f"{p} does not hold a JSON object")
    return meta


def _load_npz(path: Path, expected_sha: str | None) -> dict[str, Array]:
    if not path.exists():
        raise DatasetError(f"data file {path} is missing")
    got = sha256_file(path) if expected_sha is not None else None
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
    meta = read_meta(root)
    sv = meta.get("schema_version")
    if sv != SCHEMA_VERSION:
        raise SchemaVersionError(f"dataset {root} has schema version {sv!r}; this code reads schema version "
                                 f"{SCHEMA_VERSION}")
    ev = meta.get("env_version")
    if ev != ENV_VERSION:
        raise EnvVersionError(f"dataset {root} was collected with env version {ev!r}; this code's environment is "
                              f"{ENV_VERSION!r} (dynamics differ: recollect, or check out a matching revision)")
    for key in ("dims", "files", "discrete", "config", "preset"):
        if key not in meta:
            raise SchemaError(f"{root / META_FILE}: missing key {key!r}")
    if expected_discrete is not None and bool(meta["discrete"]) != expected_discrete:
        raise ConfigMismatchError(f"dataset {root} has {'discrete' if meta['discrete'] else 'continuous'} actions, "
                                  f"expected {'discrete' if expected_discrete else 'continuous'}")
    if expected_config is not None:
        check_config(meta, expected_config, str(root))
    dims = {k: int(v) for k, v in meta["dims"].items()}
    tables: dict[str, dict[str, Array]] = {}
    for table, name in (("transitions", TRANSITIONS_FILE), ("impressions", IMPRESSIONS_FILE)):
        entry = meta["files"].get(name)
        if entry is None or "sha256" not in entry:
            raise SchemaError(f"{root / META_FILE}: no checksum recorded for {name!r}")
        arrays = _load_npz(root / name, entry["sha256"] if verify_checksums else None)
        validate_arrays(table, arrays, dims, bool(meta["discrete"]), source=str(root / name))
        tables[table] = arrays
    tr = Transitions(**{k: tables["transitions"][k] for k in TRANSITION_SCHEMA})
    imp = Impressions(**{k: tables["impressions"][k] for k in IMPRESSION_SCHEMA})
    validate_episodes(tr)
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
