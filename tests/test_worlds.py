"""Training on many worlds (``envs.world_mix.WorldMix``): each group of users lives in its own world, a world
ends after its life and is rebuilt from its next seed, and everything stays reproducible; CEM and data
collection spread their users over the worlds."""

from __future__ import annotations

import numpy as np
import pytest

from agents.cem import cem_tune
from envs.config import make_config
from envs.feed_env import FeedVectorEnv
from envs.sb3 import SB3FeedVecEnv
from envs.simulator import FeedSimulator
from envs.world_mix import WorldMix, make_simulator, world_seed
from offline_data import GaussianKnobs, collect, load_dataset
from rankers.config import N_KNOBS
from tests.helpers import knob_actions

CFG = make_config("tiny")


def _run(sim, actions):
    obs = [sim.reset()]
    out = []
    for a in actions:
        res = sim.step(a)
        out.append((res.obs, res.reward, res.terminated, res.truncated))
        done = res.terminated | res.truncated
        if done.any():
            obs.append(sim.reset(done))
    return obs, out


def test_one_world_forever_is_the_simulator() -> None:
    acts = knob_actions(15, 6, seed=4)
    (o1, r1), (o2, r2) = _run(FeedSimulator(CFG, 6, seed=11), acts), _run(WorldMix(CFG, 6, seed=11), acts)
    for a, b in zip(o1, o2, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(r1, r2, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)
    assert isinstance(make_simulator(CFG, 6, 11), FeedSimulator)
    assert isinstance(make_simulator(CFG, 6, 11, worlds=2), WorldMix)


def test_each_group_lives_in_its_own_world() -> None:
    """Rows of world k are exactly a simulator built from world k's seed (before any world ends)."""
    mix = WorldMix(CFG, 7, seed=5, worlds=3)
    assert mix.bounds.tolist() == [0, 3, 5, 7] and mix.world_of.tolist() == [0, 0, 0, 1, 1, 2, 2]
    assert mix.world_seeds == [5, world_seed(5, 1, 0), world_seed(5, 2, 0)]
    assert len(set(mix.world_seeds)) == 3
    acts = knob_actions(12, 7, seed=2)
    obs_mix, res_mix = _run(mix, acts)
    for k, n in enumerate((3, 2, 2)):
        rows = slice(mix.bounds[k], mix.bounds[k + 1])
        obs_k, res_k = _run(FeedSimulator(CFG, n, seed=world_seed(5, k, 0)), acts[:, rows])
        np.testing.assert_array_equal(obs_mix[0][rows], obs_k[0])
        for (o, r, te, tr), (ok, rk, tek, trk) in zip(res_mix, res_k, strict=True):
            np.testing.assert_array_equal(o[rows], ok)
            np.testing.assert_array_equal(r[rows], rk)
            np.testing.assert_array_equal(te[rows] | tr[rows], tek | trk)


def test_worlds_end_staggered_and_are_rebuilt_from_their_next_seed() -> None:
    mix = WorldMix(CFG, 4, seed=9, worlds=2, world_steps=6)
    mix.reset()
    a = np.zeros((4, knob_actions(1, 1).shape[-1]), np.float32)
    assert [mix.lifetime(k) for k in range(2)] == [3, 6]  # world k's first life: world_steps * (k + 1) / K
    ended_at = {}
    for t in range(1, 13):
        res = mix.step(a)
        for k in range(2):
            if mix.ended[k]:
                rows = slice(mix.bounds[k], mix.bounds[k + 1])
                assert (res.terminated[rows] | res.truncated[rows]).all()  # every episode in it ends
                ended_at.setdefault(k, []).append(t)
        done = res.terminated | res.truncated
        if done.any():
            first = mix.reset(done)
            for k in range(2):
                if ended_at.get(k, [None])[-1] == t:  # rebuilt from its next seed: a fresh simulator's first obs
                    g = mix.generation[k]
                    assert mix.world_seeds[k] == world_seed(9, k, g)
                    fresh = FeedSimulator(CFG, 2, seed=world_seed(9, k, g)).reset()
                    np.testing.assert_array_equal(first[mix.bounds[k]:mix.bounds[k + 1]], fresh)
    assert ended_at == {0: [3, 9], 1: [6, 12]}


def test_bad_mix_arguments_are_named() -> None:
    for kw, word in (({"worlds": 0}, "worlds=0"), ({"worlds": 9}, "n_users=4"), ({"world_steps": -1}, "world_steps")):
        with pytest.raises(ValueError, match=word):
            WorldMix(CFG, 4, seed=0, **kw)
    with pytest.raises(ValueError, match="action has shape"):
        WorldMix(CFG, 4, seed=0, worlds=2).step(np.zeros((3, 2), np.float32))


def test_gymnasium_vector_env_runs_through_world_ends() -> None:
    """Next-step autoreset: finished users are stepped once more, then reset with their world rebuilt."""
    env = FeedVectorEnv(4, config=CFG, worlds=2, world_steps=4)
    obs, _ = env.reset(seed=5)
    truncs = []
    for a in knob_actions(9, 4, seed=3):
        obs, _, _, trunc, _ = env.step(a)
        truncs.append(trunc.copy())
        assert np.isfinite(obs).all()
    truncs = np.asarray(truncs)
    assert truncs[1, :2].all() and truncs[3, 2:].all()  # world 0's first life is 2 steps, world 1's 4
    assert env.sim.generation == [2, 1]  # world 0 rebuilt at steps 3 and 8 (lives of 4), world 1 at step 5


def test_a_world_ending_while_other_users_finish_is_rebuilt_once() -> None:
    """Short episodes (max_steps 3) end all the time; a world's end then meets resets that reach only some
    of its users (or none): the world is rebuilt once, when a reset first reaches it."""
    cfg = make_config("tiny", max_steps=3)
    env = FeedVectorEnv(4, config=cfg, worlds=2, world_steps=10)
    env.reset(seed=1)
    for a in knob_actions(25, 4, seed=2):
        obs, _, _, _, _ = env.step(a)
        assert np.isfinite(obs).all()
    assert env.sim.generation == [2, 2]
    mix = WorldMix(cfg, 4, seed=0, worlds=2, world_steps=2)
    mix.reset()
    mix.step(knob_actions(1, 4)[0])  # world 0's first life (1 step) ends
    assert mix.ended.tolist() == [True, False]
    mix.reset(np.array([False, False, True, False]))  # misses world 0: it waits
    assert mix.ended.tolist() == [True, False] and mix.generation == [0, 0]
    mix.reset(np.array([True, False, False, False]))  # reaches it: rebuilt, all its users new
    assert mix.ended.tolist() == [False, False] and mix.generation == [1, 0]


def test_sb3_env_truncates_at_a_worlds_end_and_is_reproducible() -> None:
    def run() -> list[np.ndarray]:
        env = SB3FeedVecEnv(4, config=CFG, seed=3, worlds=2, world_steps=4)
        obs = [env.reset()]
        ends = []
        for a in knob_actions(8, 4, seed=1):
            env.step_async(a)
            o, _, done, infos = env.step_wait()
            obs.append(o)
            ends.append([bool(i.get("TimeLimit.truncated")) for i in infos])
            for i in np.flatnonzero(done):
                assert "terminal_observation" in infos[i]
        obs.append(np.asarray(ends))
        return obs

    a, b = run(), run()
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    ends = a[-1]
    assert ends[1, :2].all() and ends[3, 2:].all()  # world 0 ends after 2 steps, world 1 after 4


def test_cem_spreads_every_candidate_over_the_worlds() -> None:
    kw = {"n_candidates": 4, "users_per_candidate": 4, "steps_per_iter": 10, "worlds": 2, "world_steps": 15}
    r1, r2 = cem_tune(CFG, 480, seed=2, **kw), cem_tune(CFG, 480, seed=2, **kw)
    np.testing.assert_array_equal(r1.best_action, r2.best_action)
    assert r1.steps_used == 480 and len(r1.history) == 3
    unpaired = {**kw, "paired": False}  # at this budget paired candidates tie too often to move the mean
    one, two = (cem_tune(CFG, 480, seed=2, **{**unpaired, "worlds": 1, "world_steps": 0}),
                cem_tune(CFG, 480, seed=2, **unpaired))
    assert not np.array_equal(one.best_action, two.best_action)  # the other world counts
    with pytest.raises(ValueError, match="multiple of worlds"):
        cem_tune(CFG, 480, seed=2, **{**kw, "users_per_candidate": 3})


def test_collect_logs_several_worlds(tmp_path) -> None:
    pol = GaussianKnobs(0.3)
    ds = collect(pol, CFG, n_users=6, n_steps=10, seed=4, worlds=2, out=tmp_path / "ds")
    tr, imp = ds.transitions, ds.impressions
    assert set(np.unique(tr.world)) == {0, 1} and set(np.unique(imp.world)) == {0, 1}
    assert ds.meta["collection"]["world_seeds"] == [4, world_seed(4, 1, 0)]
    # episodes never span worlds, and every impression points at a transition of its world and episode
    for e in np.unique(tr.episode_id):
        assert np.unique(tr.world[tr.episode_id == e]).size == 1
    np.testing.assert_array_equal(tr.world[imp.transition_index], imp.world)
    np.testing.assert_array_equal(tr.episode_id[imp.transition_index], imp.episode_id)
    # world 0 is the log a one-world collection with its users makes (the policy's stream starts there)
    one = collect(pol, CFG, n_users=3, n_steps=10, seed=4)
    w0 = tr.world == 0
    np.testing.assert_array_equal(tr.observations[w0], one.transitions.observations)
    np.testing.assert_array_equal(tr.actions[w0], one.transitions.actions)
    back = load_dataset(tmp_path / "ds", expected_config=CFG)
    np.testing.assert_array_equal(back.transitions.world, tr.world)
    with pytest.raises(ValueError, match="worlds=7"):
        collect(pol, CFG, n_users=6, n_steps=2, seed=4, worlds=7)


def test_a_users_random_numbers_follow_the_user_not_the_batch_step() -> None:
    """A user's numbers depend on the world, the user and the user's own request and session counts, not
    on the row the user sits in or who else is in the batch (synchronised common random numbers)."""
    a, b = FeedSimulator(CFG, 4, seed=2), FeedSimulator(CFG, 4, seed=2)
    a.reset()
    b.reset()
    pc = CFG.pipeline
    first = a._noise(pc.slate_size, pc.n_rank)
    b.retire(np.array([True, False, False, False]))
    later = b._noise(pc.slate_size, pc.n_rank)
    for x, y in zip(first, later, strict=True):
        np.testing.assert_array_equal(x[1:], y)
    a.steps[:] += 1  # the next request of the same users: other numbers
    nxt = a._noise(pc.slate_size, pc.n_rank)
    assert not np.array_equal(nxt[0], first[0]) and not np.array_equal(nxt[3], first[3])
    np.testing.assert_array_equal(nxt[2], first[2])  # session numbers move with the session, not the request
    other = FeedSimulator(CFG, 4, seed=3)
    other.reset()
    assert not np.array_equal(other._noise(pc.slate_size, pc.n_rank)[0], nxt[0])
    u = first[0].ravel()
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02


def test_ranker_rows_refuse_a_log_of_several_worlds() -> None:
    from offline_data.ranker_rows import dataset_rows

    ds = collect(GaussianKnobs(0.3), CFG, n_users=4, n_steps=3, seed=1, worlds=2)
    with pytest.raises(ValueError, match="collected on 2 worlds"):
        dataset_rows(ds, CFG, 1)


def test_keyed_users_are_clones_that_differ_only_by_the_actions() -> None:
    """``key_users``: rows with one identity start the same users, whenever each is reset, in one world or
    in a mix; under the same actions clones live the same lives, under other actions they do not."""
    for worlds, life in ((1, 0), (2, 25)):
        sim = make_simulator(CFG, 8, 3, worlds, life)
        sim.key_users(np.arange(8) // 2)  # identities 0 0 1 1 2 2 3 3; worlds split rows 0-3 / 4-7
        sim.reset()
        acts = knob_actions(150, 4, seed=1)
        total, watch, ends = np.zeros(8), np.zeros(8), 0
        for a in acts:
            a = np.repeat(a, 2, axis=0)  # both clones of an identity get the same action
            a[1] = -a[0]  # except identity 0's second clone
            res = sim.step(a)
            total += res.reward
            watch += res.info["engagement/watch_s"]
            done = res.terminated | res.truncated
            ends += int(done[2:].sum())
            if done.any():
                sim.reset(done)
        assert ends > 0  # the clones went through resets, and drew the same replacement users
        np.testing.assert_array_equal(total[2::2], total[3::2])
        np.testing.assert_array_equal(watch[2::2], watch[3::2])
        assert watch.reshape(4, 2)[1:, 0].std() > 0  # identities are different users
        assert watch[0] != watch[1]  # (the return counts, a coarse reward, may tie)


def test_a_clone_reset_later_starts_the_same_user() -> None:
    sim = FeedSimulator(CFG, 3, seed=5)
    sim.key_users(np.array([7, 7, 8]))
    sim.reset()
    u = sim.users
    np.testing.assert_array_equal(u.long[0], u.long[1])
    assert u.key[0] == u.key[1] != u.key[2]
    sim.reset(np.array([True, False, False]))  # row 0's second user; row 1 keeps its first
    assert u.key[0] != u.key[1]
    first_of_0 = u.key[0]
    sim.reset(np.array([False, True, False]))  # row 1's second user is row 0's
    assert u.key[1] == first_of_0
    np.testing.assert_array_equal(sim.view.emb[1], sim.view.emb[0])  # the system's first view too
    sim.key_users(None)  # back to the batch stream: a fresh draw for everyone
    sim.reset()
    assert len({int(k) for k in u.key}) == 3
    with pytest.raises(ValueError, match="non-negative integer identities"):
        sim.key_users(np.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        sim.key_users(np.arange(4))


def test_paired_cem_compares_candidates_on_the_same_users() -> None:
    """With every candidate at the mean (no spread), paired candidates are clones served the same action:
    their fitness differences are exactly 0; unpaired ones serve different users."""
    kw = {"n_candidates": 4, "users_per_candidate": 4, "steps_per_iter": 20, "init_std": 0.0, "min_std": 0.0}
    paired = cem_tune(CFG, 960, seed=2, **kw)
    unpaired = cem_tune(CFG, 960, seed=2, paired=False, **kw)
    assert [h["fitness_diff_se"] for h in paired.history] == [0.0] * 3
    assert all(h["fitness_diff_se"] > 0 for h in unpaired.history)


def test_copied_users_branch_from_one_state() -> None:
    """``copy_users``: after 60 steps under different actions, copies of row 0 (and of row 4 in the other
    world) live the same lives under the same actions, through resets; copies across worlds are refused."""
    sim = make_simulator(CFG, 8, 3, 2, 0)
    sim.key_users(np.arange(8))  # no clones yet: copies must take their source's identity to stay copies
    sim.reset()
    for a in knob_actions(60, 8, seed=2):
        res = sim.step(a)
        done = res.terminated | res.truncated
        if done.any():
            sim.reset(done)
    src = np.array([0, 0, 0, 3, 4, 4, 4, 7])
    generation = np.concatenate([w.user_generation for w in sim.sims])
    assert generation.max() > 1  # some rows started a second user in the first 60 steps
    sim.copy_users(src)
    lead = sim.sims[0]
    np.testing.assert_array_equal(lead.users.long[1], lead.users.long[0])
    np.testing.assert_array_equal(np.concatenate([w.user_generation for w in sim.sims]), generation[src])
    np.testing.assert_array_equal(sim.user_identity, src)
    total, ends = np.zeros(8), 0
    for a in knob_actions(150, 8, seed=3):
        res = sim.step(a[src])  # copies get their source's actions
        total += res.reward
        done = res.terminated | res.truncated
        ends += int(done.sum())
        if done.any():
            sim.reset(done)
    assert ends > 0
    np.testing.assert_array_equal(total[[1, 2]], total[[0, 0]])
    np.testing.assert_array_equal(total[[5, 6]], total[[4, 4]])
    with pytest.raises(ValueError, match="within their world"):
        sim.copy_users(np.array([4, 1, 2, 3, 4, 5, 6, 7]))
    with pytest.raises(ValueError, match=r"integer rows in \[0, 8\)"):
        sim.copy_users(np.arange(8) + 1)
    one = FeedSimulator(CFG, 4, seed=1)
    one.reset()
    one.retire(np.array([True, False, False, False]))
    one.copy_users(np.zeros(3, np.int64))  # the rows of the batch now: the three users left become copies of one
    res = one.step(np.zeros((3, N_KNOBS), np.float32))
    assert np.all(res.obs == res.obs[0]) and np.all(one.users.long == one.users.long[0])


def test_keyed_users_survive_world_rebuilds() -> None:
    """Identities are kept when a mix is rebuilt (``seed``) and when a world's life ends: clones stay clones."""
    sim = WorldMix(CFG, 8, 3, 2, 12)
    sim.key_users(np.arange(8) // 2)
    sim.seed(4)
    sim.reset()
    total, rebuilt = np.zeros(8), 0
    for a in knob_actions(60, 4, seed=5):
        res = sim.step(np.repeat(a, 2, axis=0))
        total += res.reward
        done = res.terminated | res.truncated
        rebuilt += int(sim.ended.sum())
        if done.any():
            sim.reset(done)
    assert rebuilt > 0 and max(sim.generation) > 0
    np.testing.assert_array_equal(total[0::2], total[1::2])
    with pytest.raises(ValueError, match="non-negative integer identities"):
        sim.key_users(-np.ones(8, np.int64))
    np.testing.assert_array_equal(sim.user_identity, np.arange(8) // 2)  # a refused call changes nothing
