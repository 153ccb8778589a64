"""Conversions of a :class:`~offline_data.dataset.LoggedDataset` to d3rlpy and Minari.

d3rlpy (2.8.1) builds episodes from rows ``(observation, action, reward, terminal, timeout)`` and
has no next-observation column. A terminal episode of T rows gives T transitions (the last one's next
observation is zeros), but a timeout episode gives only T - 1: its last row serves as the final
observation and its action and reward are dropped (DEPS-NOTES §4c). :func:`to_mdp_dataset` therefore
appends, after each episode that ended by timeout or collection cutoff, one extra row holding the
true final observation (``next_observations`` of its last transition) with a zero action
(discrete: preset 0) and reward 0, and sets the timeout flag on that extra row only. Every logged
transition then survives, with its real next observation. Terminals and timeouts stay apart (2.8.1
asserts they never overlap); cutoffs count as timeouts.

Minari (0.5.4): :func:`to_minari` writes one ``EpisodeBuffer`` per episode with ``T + 1``
observations (the last is the true final observation) via ``minari.create_dataset_from_buffers``
(no jax needed); ``truncations`` = timeout or cutoff. :func:`minari_to_arrays` reads it back by hand
(``observations[:-1]`` and ``observations[1:]`` per episode) -- never d3rlpy's ``get_minari``, which
concatenates the T + 1 observations against T actions and shifts every later episode.
The behaviour log-probabilities and impressions are not exported to Minari.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np

from offline_data.dataset import DatasetError, LoggedDataset
from rankers.types import Array

if TYPE_CHECKING:
    from d3rlpy.dataset import MDPDataset


def d3rlpy_arrays(observations: Array, actions: Array, rewards: Array, next_observations: Array,
                  terminals: Array, truncations: Array, episode_ends: Array,
                  keep_last_timeout_transition: bool = True) -> dict[str, Array]:
    """Row arrays for ``d3rlpy.dataset.MDPDataset`` from episode-major transitions.

    Args:
        observations, next_observations: (M, D) float32. actions: (M, A) or (M,). rewards: (M,).
        terminals: (M,) bool churn. truncations: (M,) bool timeout or cutoff (never with a terminal).
        episode_ends: (n_episodes,) int64 exclusive end row of each episode.
        keep_last_timeout_transition: append the final observation after each truncated episode
            (see the module docstring); False = d3rlpy's default behaviour (its last transition is lost).

    Returns:
        ``observations, actions, rewards, terminals, timeouts`` (float32 flags, exclusive).
    """
    term = np.asarray(terminals, bool)
    trunc = np.asarray(truncations, bool) & ~term
    if not keep_last_timeout_transition:
        return {"observations": observations.astype(np.float32), "actions": actions,
                "rewards": rewards.astype(np.float32), "terminals": term.astype(np.float32),
                "timeouts": trunc.astype(np.float32)}
    last = np.asarray(episode_ends, np.int64) - 1
    pad_rows = last[trunc[last]]  # last rows of truncated episodes
    at = pad_rows + 1  # insert after them
    pad_act = np.zeros((pad_rows.size, *actions.shape[1:]), actions.dtype)
    obs = np.insert(observations, at, next_observations[pad_rows], axis=0)
    act = np.insert(actions, at, pad_act, axis=0)
    rew = np.insert(rewards.astype(np.float32), at, np.zeros(pad_rows.size, np.float32))
    t_flag = np.insert(term, at, np.zeros(pad_rows.size, bool))
    o_flag = np.insert(np.zeros_like(trunc), at, np.ones(pad_rows.size, bool))
    return {"observations": obs.astype(np.float32), "actions": act, "rewards": rew,
            "terminals": t_flag.astype(np.float32), "timeouts": o_flag.astype(np.float32)}


def quiet_d3rlpy() -> None:
    """d3rlpy logs INFO/DEBUG to stdout through structlog by default (coloured lines such as "Signatures have been
    automatically determined" in every script's output); keep its warnings and errors only."""
    import d3rlpy  # noqa: F401  (its import configures structlog; configure after it)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _mdp(arrays: dict[str, Array], discrete: bool, n_actions: int) -> MDPDataset:
    import d3rlpy

    quiet_d3rlpy()

    if discrete:
        return d3rlpy.dataset.MDPDataset(
            observations=arrays["observations"], actions=arrays["actions"].astype(np.int64),
            rewards=arrays["rewards"], terminals=arrays["terminals"], timeouts=arrays["timeouts"],
            action_space=d3rlpy.ActionSpace.DISCRETE, action_size=int(n_actions))
    return d3rlpy.dataset.MDPDataset(
        observations=arrays["observations"], actions=arrays["actions"].astype(np.float32),
        rewards=arrays["rewards"], terminals=arrays["terminals"], timeouts=arrays["timeouts"],
        action_space=d3rlpy.ActionSpace.CONTINUOUS)


def to_mdp_dataset(ds: LoggedDataset, keep_last_timeout_transition: bool = True) -> MDPDataset:
    """A ``d3rlpy.dataset.MDPDataset`` with one d3rlpy episode per logged episode.

    Continuous data: float32 knob actions (A,). Discrete data: int64 menu indices with
    ``action_size=int(P)``. See the module docstring for how timeouts keep their last transition.
    """
    tr = ds.transitions
    if len(tr) == 0:  # d3rlpy would only assert "No episode termination was found"
        raise DatasetError("to_mdp_dataset: the dataset has no transitions (an empty selection, e.g. select_episodes "
                           "or split_by_user kept no episode): d3rlpy needs at least one episode")
    _, ends = tr.episode_bounds()
    arrays = d3rlpy_arrays(tr.observations, tr.actions, tr.rewards, tr.next_observations, tr.terminals,
                           tr.timeouts | tr.cutoffs, ends, keep_last_timeout_transition)
    n_act = len(ds.meta["menu_names"])
    return _mdp(arrays, ds.discrete, n_act)


def _spaces(ds: LoggedDataset) -> tuple[Any, Any]:
    from gymnasium import spaces

    d = int(ds.transitions.observations.shape[1])
    obs_space = spaces.Box(-10.0, 10.0, (d,), np.float32)
    if ds.discrete:
        act_space: Any = spaces.Discrete(len(ds.meta["menu_names"]))
    else:
        act_space = spaces.Box(-1.0, 1.0, (int(ds.transitions.knob_actions.shape[1]),), np.float32)
    return obs_space, act_space


def to_minari(ds: LoggedDataset, dataset_id: str, *, data_format: str = "hdf5", description: str | None = None,
              author: str = "feedgym", author_email: str = "feedgym@localhost",
              code_permalink: str = "https://github.com/feedgym/feedgym") -> Any:
    """Writes ``ds`` as Minari dataset ``dataset_id`` (``namespace/name-v0``) under ``MINARI_DATASETS_PATH``.

    Returns the ``minari.MinariDataset``. The env spec is recorded when the data's config is exactly
    its named preset (then ``recover_environment`` works); otherwise only the spaces are.
    """
    import gymnasium as gym
    import minari
    from minari.data_collector import EpisodeBuffer

    import envs  # noqa: F401 - registers the env ids
    from envs.config import make_config
    from offline_data.dataset import config_to_json

    tr = ds.transitions
    starts, ends = tr.episode_bounds()
    buffers = []
    for i, (s, e) in enumerate(zip(starts, ends)):
        obs = np.concatenate([tr.observations[s:e], tr.next_observations[e - 1: e]], axis=0)
        buffers.append(EpisodeBuffer(
            id=i, observations=obs, actions=tr.actions[s:e].copy(), rewards=tr.rewards[s:e].astype(np.float64),
            terminations=tr.terminals[s:e].copy(), truncations=(tr.timeouts[s:e] | tr.cutoffs[s:e]), infos={}))
    obs_space, act_space = _spaces(ds)
    env_spec = None
    preset = ds.meta.get("preset")
    try:
        if preset and config_to_json(make_config(preset)) == ds.meta.get("config"):
            env_spec = dataclasses.replace(gym.spec(ds.meta["env_id"]), kwargs={"preset": preset})
    except (ValueError, gym.error.Error):
        env_spec = None
    desc = description or (f"feedgym logged dataset: env {ds.meta.get('env_id')} preset {preset!r}, "
                           f"env version {ds.meta.get('env_version')}, seed {ds.meta.get('seed')}, "
                           f"behaviour {ds.meta.get('behaviour', {}).get('kind')}")
    return minari.create_dataset_from_buffers(
        dataset_id=dataset_id, buffer=buffers, env=env_spec, eval_env=env_spec, observation_space=obs_space,
        action_space=act_space,
        algorithm_name=str(ds.meta.get("behaviour", {}).get("kind", "unknown")), author=author,
        author_email=author_email, code_permalink=code_permalink, description=desc, data_format=data_format)


def minari_to_arrays(dataset_id: str) -> dict[str, Array]:
    """Reads a Minari dataset back into aligned, episode-major transition arrays (by hand).

    Returns ``observations, next_observations`` (M, D) float32, ``actions``, ``rewards`` (M,) float32,
    ``terminals, truncations`` (M,) bool, ``episode_ends`` (n_episodes,) int64 exclusive end rows.
    """
    import minari

    eps = list(minari.load_dataset(dataset_id).iterate_episodes())
    if not eps:
        raise ValueError(f"Minari dataset {dataset_id!r} has no episodes")
    lengths = np.array([len(e.rewards) for e in eps], np.int64)
    for e in eps:
        if len(e.observations) != len(e.rewards) + 1:
            raise ValueError(f"Minari episode {e.id} has {len(e.observations)} observations for {len(e.rewards)} "
                             "steps; expected T + 1")
    return {
        "observations": np.concatenate([e.observations[:-1] for e in eps]).astype(np.float32),
        "next_observations": np.concatenate([e.observations[1:] for e in eps]).astype(np.float32),
        "actions": np.concatenate([e.actions for e in eps]),
        "rewards": np.concatenate([e.rewards for e in eps]).astype(np.float32),
        "terminals": np.concatenate([e.terminations for e in eps]).astype(bool),
        "truncations": np.concatenate([e.truncations for e in eps]).astype(bool),
        "episode_ends": np.cumsum(lengths),
    }


def minari_to_mdp_dataset(dataset_id: str, keep_last_timeout_transition: bool = True) -> MDPDataset:
    """A d3rlpy ``MDPDataset`` from a Minari dataset, aligned by hand (see :func:`minari_to_arrays`)."""
    import minari

    a = minari_to_arrays(dataset_id)
    space = minari.load_dataset(dataset_id).action_space
    discrete = hasattr(space, "n")
    arrays = d3rlpy_arrays(a["observations"], a["actions"], a["rewards"], a["next_observations"], a["terminals"],
                           a["truncations"], a["episode_ends"], keep_last_timeout_transition)
    return _mdp(arrays, discrete, int(space.n) if discrete else 0)
