"""Rolls a behaviour policy through the batched simulator and logs transitions and impressions.

Two collection modes (``autoreset``):

- ``autoreset=True`` (default): the simulator's B slots are stepped exactly ``n_steps`` times; a slot
  whose user churned or reached the horizon starts a new user at once (same-step autoreset: the
  finished episode's ``next_observations`` row holds its true final observation, the next row the new
  user's first). Episodes still running after the last step end with ``cutoffs = True`` (neither
  terminal nor timeout). Budget = ``n_users * n_steps`` transitions exactly.
- ``autoreset=False``: one episode per slot (one user each). Stepping stops when every episode has
  ended or after ``n_steps`` (``None`` = ``config.max_steps``); episodes still running are cut off.
  Users whose episode ended keep being stepped by the simulator (as ``agents.evaluation`` does) under
  the behaviour policy, but nothing of theirs is logged.

The simulator is seeded with ``seed`` exactly as ``FeedSimulator(cfg, n_users, seed)`` (so its world
and users are those every evaluation on that seed sees); the behaviour policy draws from its own child
stream ``SeedSequence(seed, spawn_key=(POLICY_STREAM,))``. Same seed, same policy -> identical arrays.

With ``worlds=K`` each world is a shard: its own simulator and its own policy stream (world 0's is the one above,
world k's ``SeedSequence(seed, spawn_key=(POLICY_STREAM, k))``), so the shards are independent jobs that run on
an executor (:mod:`offline_data.executor`: in this process, or on Ray) and merge into one dataset, the same bytes
whatever ran them.

Everything that can be checked before the rollouts is (the arguments, ``out`` against an existing dataset,
``extra_meta`` as strict JSON, a discrete policy's menu against the env's), and the policy's actions
are checked at every step before the simulator serves them: a discrete action must be an integer menu
index in [0, P) (a negative index would serve an entry from the end of the menu, a fraction would be
truncated), a continuous one a finite vector in [-1, 1]. Bad input raises ``ValueError`` naming the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from envs.config import ENV_VERSION, FeedConfig, make_config
from envs.feed_env import MENU_MATRIX, MENU_NAMES
from envs.learned import served_models
from envs.simulator import FeedSimulator
from envs.world_mix import world_seed, world_sizes
from offline_data.dataset import (
    IMPRESSION_SCHEMA,
    RESPONSE_FLAGS,
    RESPONSE_FLOATS,
    TRANSITION_SCHEMA,
    Impressions,
    LoggedDataset,
    Transitions,
    check_save_target,
    config_to_json,
    counts_of,
    git_revision,
    meta_to_json,
    save_dataset,
)
from offline_data.executor import Executor, LocalExecutor
from offline_data.policies import BehaviourPolicy, menu_indices
from rankers.config import KNOB_NAMES
from rankers.types import Array

POLICY_STREAM = 0x0FF1
ENV_IDS = {False: "feedgym/ForYouFeed-v0", True: "feedgym/ForYouFeedDiscrete-v0"}


class _Snapshot:
    """What the system could see about items and users just before a request (preallocated copies:
    the world recycles item ids and resets creators during ``step``, so features are read before it)."""

    def __init__(self, sim: FeedSimulator) -> None:
        cat = sim.corpus.catalog
        self.topic = np.empty_like(cat.topic)
        self.creator = np.empty_like(cat.creator)
        self.format = np.empty_like(cat.format)
        self.duration_s = np.empty_like(cat.duration_s)
        self.impressions = np.empty_like(cat.impressions)
        self.user_emb = np.empty_like(sim.view.emb)
        self.new_creator = np.empty(cat.n_creators, bool)

    def take(self, sim: FeedSimulator) -> None:
        cat = sim.corpus.catalog
        for name in ("topic", "creator", "format", "duration_s", "impressions"):
            src = getattr(cat, name)
            dst = getattr(self, name)
            if dst.shape != src.shape:  # catalog arrays were reallocated (should not happen; stay correct)
                dst = np.empty_like(src)
                setattr(self, name, dst)
            np.copyto(dst, src)
        nc = cat.new_creator_mask()
        if self.new_creator.shape != nc.shape:
            self.new_creator = np.empty_like(nc)
        np.copyto(self.new_creator, nc)
        np.copyto(self.user_emb, sim.view.emb)


class EpisodeSlots:
    """Episode ids, per-episode step counters, user ids and the active mask of B simulator slots.

    The one place the collection loop (and its exact replay in ``agents.ope``) advances episodes:
    with ``autoreset`` a finished slot gets a new user and episode id at once (except on the last
    step); without it the slot goes inactive.
    """

    def __init__(self, sim: FeedSimulator, autoreset: bool) -> None:
        b = sim.n_users
        self.autoreset = autoreset
        self.episode = np.arange(b, dtype=np.int64)
        self.next_episode = b
        self.step = np.zeros(b, np.int32)
        self.user = sim.view.user_key.astype(np.int64)
        self.active = np.ones(b, bool)

    def advance(self, sim: FeedSimulator, obs: Array, done: Array, last: bool) -> Array:
        """After a step: counts it, resets finished slots (autoreset) or retires them; returns the next obs."""
        self.step += 1
        if not self.autoreset:
            self.active &= ~done
            return obs
        if done.any() and not last:
            obs = np.where(done[:, None], sim.reset(done), obs)
            n_new = int(done.sum())
            self.episode[done] = self.next_episode + np.arange(n_new)
            self.next_episode += n_new
            self.step[done] = 0
            self.user[done] = sim.view.user_key[done].astype(np.int64)
        return obs


def collect(policy: BehaviourPolicy, config: FeedConfig | str = "tiny", *, n_users: int = 16,
            n_steps: int | None = 64, seed: int = 0, autoreset: bool = True, out: str | Path | None = None,
            overwrite: bool = False, progress: bool = False, extra_meta: dict[str, Any] | None = None,
            worlds: int = 1, executor: Executor | None = None) -> LoggedDataset:
    """Collects a logged dataset (and writes it to ``out`` if given).

    Args:
        policy: a behaviour policy (``offline_data.policies``); its ``discrete`` flag picks the env face.
        config: a :class:`FeedConfig` or a preset name.
        n_users: B, simulator slots stepped together.
        n_steps: batched steps (``autoreset=True``, required) or a cap (``autoreset=False``; None = max_steps).
        seed: seeds the simulator and (through a child stream) the policy.
        autoreset: see the module docstring.
        out: dataset directory to write (``save_dataset``); None = keep in memory only.
        overwrite: replace an existing dataset at ``out``.
        progress: show a tqdm bar.
        extra_meta: merged into ``meta.json`` (e.g. the script's arguments).
        worlds: K, worlds logged one after another, each with its share of the ``n_users`` slots (the
            same ``n_steps`` each); world k is ``FeedSimulator(cfg, ., envs.world_mix.world_seed(seed, k, 0))``
            (world 0 is the one ``seed`` builds), logged with the policy's stream of that world (module
            docstring). Rows carry their ``world``; episode ids are unique across worlds.
        executor: where the worlds (shards) are logged (default: one after another in this process); the
            dataset is the same on any executor.

    Returns:
        The dataset (transitions episode-major, impressions sorted by episode, step, position).
    """
    cfg = make_config(config) if isinstance(config, str) else config
    if not isinstance(cfg, FeedConfig):
        raise TypeError(f"config must be a FeedConfig or preset name, got {type(config).__name__}")
    if not isinstance(n_users, (int, np.integer)) or n_users < 1:
        raise ValueError(f"n_users={n_users!r} is invalid: must be an int >= 1")
    if autoreset and (n_steps is None or n_steps < 1):
        raise ValueError(f"n_steps={n_steps!r} is invalid: autoreset collection needs n_steps >= 1")
    cap = int(n_steps) if n_steps is not None else int(cfg.max_steps)
    if cap < 1:
        raise ValueError(f"n_steps={n_steps!r} is invalid: must be >= 1")
    discrete = bool(policy.discrete)
    if not isinstance(worlds, (int, np.integer)) or not 1 <= worlds <= n_users:
        raise ValueError(f"worlds={worlds!r} is invalid: must be an int in [1, n_users={n_users}]")
    menu_size = getattr(policy, "menu_size", None)
    if discrete and menu_size is not None and not 1 <= menu_size <= len(MENU_NAMES):
        raise ValueError(f"behaviour policy menu_size={menu_size!r} is invalid for {ENV_IDS[True]}: its knob menu "
                         f"has {len(MENU_NAMES)} entries (indices 0..{len(MENU_NAMES) - 1}: {MENU_NAMES})")
    if extra_meta is not None:
        if not isinstance(extra_meta, dict):
            raise TypeError(f"extra_meta must be a dict, got {type(extra_meta).__name__}")
        meta_to_json(extra_meta, "extra_meta")  # before the rollouts, not when the files are written
    if out is not None:
        check_save_target(out, overwrite)
    sizes = world_sizes(int(n_users), int(worlds))
    shards = [_Shard(policy, cfg, b, cap, world_seed(seed, w, 0), policy_seed(seed, w), autoreset,
                     progress and (executor is None or isinstance(executor, LocalExecutor)), w, len(sizes))
              for w, b in enumerate(sizes)]
    # the world's trained models go with the shards: an executor's worker is a fresh process, not provisioned
    logged = (executor or LocalExecutor()).map(_log_shard, shards, common=served_models(cfg),
                                               progress=progress and len(shards) > 1,
                                               desc=f"collect {cfg.preset} worlds")
    tparts: list[dict[str, Array]] = []
    iparts: list[dict[str, Array]] = []
    seeds, steps_run, n_episodes, n_rows = [], [], 0, 0
    layout_names: list[str] = []
    for w, (tr_w, im_w, t, names) in enumerate(logged):
        tr_w["episode_id"] += n_episodes
        im_w["episode_id"] += n_episodes
        im_w["transition_index"] += n_rows
        tr_w["world"] = np.full(len(tr_w["rewards"]), w, np.int32)
        im_w["world"] = np.full(len(im_w["video_id"]), w, np.int32)
        n_episodes = int(tr_w["episode_id"].max()) + 1 if len(tr_w["episode_id"]) else n_episodes
        n_rows += len(tr_w["rewards"])
        tparts.append(tr_w)
        iparts.append(im_w)
        seeds.append(shards[w].seed)
        steps_run.append(t)
        layout_names = names
    tr_arr = {k: np.concatenate([p[k] for p in tparts]) for k in TRANSITION_SCHEMA}
    im_arr = {k: np.concatenate([p[k] for p in iparts]) for k in IMPRESSION_SCHEMA}
    order = np.lexsort((tr_arr["step"], tr_arr["episode_id"]))
    tr_arr = {k: v[order] for k, v in tr_arr.items()}
    new_index = np.empty_like(order)
    new_index[order] = np.arange(order.size)
    im_arr["transition_index"] = new_index[im_arr["transition_index"]]
    iorder = np.lexsort((im_arr["position"], im_arr["transition_index"]))
    im_arr = {k: v[iorder] for k, v in im_arr.items()}
    tr = Transitions(**tr_arr)
    imp = Impressions(**im_arr)

    meta: dict[str, Any] = {
        "env_id": ENV_IDS[discrete],
        "env_version": ENV_VERSION,
        "preset": cfg.preset,
        "config": config_to_json(cfg),
        "seed": int(seed),
        "discrete": discrete,
        "behaviour": policy.describe(),
        "git": git_revision(),
        "collection": {"n_users": int(n_users), "n_steps": n_steps, "steps_run": max(steps_run),
                       "autoreset": bool(autoreset), "policy_stream": POLICY_STREAM, "worlds": len(sizes),
                       "world_seeds": seeds, "world_users": sizes, "world_steps_run": steps_run},
        "counts": counts_of(tr, imp),
        "knob_names": list(KNOB_NAMES),
        "menu_names": list(MENU_NAMES),
        "observation_names": layout_names,
    }
    if extra_meta:
        meta.update(extra_meta)
    ds = LoggedDataset(meta=meta, transitions=tr, impressions=imp)
    if out is not None:
        save_dataset(ds, out, overwrite=overwrite)
    return ds


def policy_seed(seed: int, world: int) -> np.random.SeedSequence:
    """The behaviour policy's stream in world ``world`` of a collection seeded with ``seed``."""
    return np.random.SeedSequence(seed, spawn_key=(POLICY_STREAM,) if world == 0 else (POLICY_STREAM, world))


@dataclass(frozen=True)
class _Shard:
    """One world of a collection: a picklable job for the executor."""

    policy: BehaviourPolicy
    cfg: FeedConfig
    users: int
    cap: int
    seed: int
    policy_seed: np.random.SeedSequence
    autoreset: bool
    progress: bool
    world: int
    worlds: int

    @property
    def label(self) -> str:
        return f"world {self.world} of {self.worlds} (seed {self.seed})"


def _log_shard(models: dict[str, Any] | None,
               shard: _Shard) -> tuple[dict[str, Array], dict[str, Array], int, list[str]]:
    """One world's log (:func:`_collect_world`, its simulator serving ``models``) and the observation's field
    names."""
    rng = np.random.default_rng(shard.policy_seed)
    bar = tqdm(total=shard.cap, desc=f"collect {shard.cfg.preset}" + (f" world {shard.world}" if shard.worlds > 1
                                                                        else ""),
               disable=not shard.progress, leave=False, unit="step")
    with bar:
        tr, im, t, sim = _collect_world(shard.policy, shard.cfg, shard.users, shard.cap, shard.seed, rng,
                                        shard.autoreset, bar, models)
    return tr, im, t, list(sim.layout.names)


def _collect_world(policy: BehaviourPolicy, cfg: FeedConfig, b: int, cap: int, seed: int, rng: np.random.Generator,
                   autoreset: bool, bar: Any, models: dict[str, Any] | None = None
                   ) -> tuple[dict[str, Array], dict[str, Array], int, FeedSimulator]:
    """One world's log: transition and impression columns (in step order; ``transition_index`` counts this
    world's rows), the steps run and the simulator."""
    discrete = bool(policy.discrete)
    sim = FeedSimulator(cfg, b, seed=seed, models=models)
    snap = _Snapshot(sim)
    obs = sim.reset()
    slots = EpisodeSlots(sim, autoreset)
    episode, user = slots.episode, slots.user  # updated in place by slots.advance

    tcols: dict[str, list[Array]] = {k: [] for k in TRANSITION_SCHEMA if k != "world"}
    icols: dict[str, list[Array]] = {k: [] for k in IMPRESSION_SCHEMA if k != "world"}
    n_rows = 0
    t = 0
    while t < cap and slots.active.any():
        active, ep_step = slots.active, slots.step
        action, logp = policy.sample(obs, rng)
        action = _check_actions(policy, action, b, discrete)
        knob = MENU_MATRIX[action] if discrete else action
        snap.take(sim)
        res = sim.step(knob)
        t += 1
        last = t == cap
        done = res.terminated | res.truncated
        rows = np.flatnonzero(active)
        row_of_slot = np.full(b, -1, np.int64)
        row_of_slot[rows] = n_rows + np.arange(rows.size)
        n_rows += rows.size
        cut = active & ~done if last else np.zeros(b, bool)
        for k, v in (("observations", obs), ("actions", action), ("knob_actions", knob), ("rewards", res.reward),
                     ("next_observations", res.obs), ("terminals", res.terminated), ("timeouts", res.truncated),
                     ("cutoffs", cut), ("behaviour_log_prob", logp), ("user_id", user), ("episode_id", episode),
                     ("step", ep_step)):
            dtype = TRANSITION_SCHEMA[k][0] if not (k == "actions" and discrete) else "int64"
            tcols[k].append(np.asarray(v)[rows].astype(dtype, copy=True))

        slate, resp = res.info["slate"], res.info["responses"]
        m = resp["shown"] & (slate.item >= 0) & active[:, None]
        ui, pos = np.nonzero(m)  # row-major: by slot, then position
        vid = slate.item[ui, pos]
        cols: dict[str, Array] = {
            "transition_index": row_of_slot[ui], "user_id": user[ui], "episode_id": episode[ui],
            "step": ep_step[ui], "position": pos, "video_id": vid,
            **{k: resp[k][ui, pos] for k in (*RESPONSE_FLOATS, *RESPONSE_FLAGS)},
            "topic": snap.topic[vid], "creator": snap.creator[vid], "format": snap.format[vid],
            "duration_s": snap.duration_s[vid], "impressions": snap.impressions[vid],
            "new_creator": snap.new_creator[snap.creator[vid]], "explore": slate.explore[ui, pos],
            "promoted": slate.promoted[ui, pos], "user_emb": snap.user_emb[ui],
        }
        for k, v in cols.items():
            icols[k].append(np.asarray(v).astype(IMPRESSION_SCHEMA[k][0], copy=False))

        obs = slots.advance(sim, res.obs, done, last)
        bar.update(1)
    bar.update(cap - t)
    tr_arr = {k: _cat(v, k, TRANSITION_SCHEMA, discrete, sim) for k, v in tcols.items()}
    im_arr = {k: _cat(v, k, IMPRESSION_SCHEMA, discrete, sim) for k, v in icols.items()}
    return tr_arr, im_arr, t, sim


def _cat(parts: list[Array], key: str, schema: dict[str, tuple[str, tuple[str, ...]]], discrete: bool,
         sim: FeedSimulator) -> Array:
    dtype = "int64" if (key == "actions" and discrete) else schema[key][0]
    if parts:
        return np.concatenate(parts).astype(dtype, copy=False)
    shape = schema[key][1]
    trailing = {"D": sim.layout.dim, "A": len(KNOB_NAMES), "E": sim.view.emb.shape[1]}
    dims = tuple(0 if d in ("M", "I") else trailing[d] for d in shape)
    if key == "actions" and discrete:
        dims = (0,)
    return np.zeros(dims, dtype)


def _name(policy: Any) -> str:
    return str(getattr(policy, "name", None) or type(policy).__name__)


def _check_actions(policy: BehaviourPolicy, action: Any, b: int, discrete: bool) -> Array:
    """The policy's actions for one step, checked before the simulator serves them: discrete (B,) integer menu
    indices in [0, P) (returned as int64), continuous (B, A) finite knob vectors in [-1, 1] (returned as they
    are, so the simulator serves what it always did); else ``ValueError`` naming the first offending value."""
    name = _name(policy)
    a = np.asarray(action)
    if discrete:
        if a.shape != (b,):
            raise ValueError(f"behaviour policy {name!r} returned discrete actions of shape {a.shape}, expected ({b},)")
        a = menu_indices(a, f"behaviour policy {name!r}")
        bad = (a < 0) | (a >= len(MENU_NAMES))
        if np.any(bad):
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"behaviour policy {name!r} returned discrete action {a[i].item()!r} (slot {i}): "
                             f"expected a menu index in [0, {len(MENU_NAMES)}) {MENU_NAMES}")
        return a
    if a.shape != (b, len(KNOB_NAMES)):
        raise ValueError(f"behaviour policy {name!r} returned actions of shape {a.shape}, "
                         f"expected ({b}, {len(KNOB_NAMES)})")
    if a.dtype.kind not in "iuf":
        raise ValueError(f"behaviour policy {name!r} returned actions of dtype {a.dtype}, expected float knob vectors")
    bad = ~(np.abs(a) <= 1.0)
    if np.any(bad):
        i = np.argwhere(bad)[0]
        raise ValueError(f"behaviour policy {name!r} returned knob value {a[tuple(i)].item()!r} (slot {i[0]}, knob "
                         f"{KNOB_NAMES[i[1]]!r}): knob vectors must be finite and in [-1, 1]")
    return action
