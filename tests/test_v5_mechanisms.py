"""Env v5: what watching and taking part are worth differs by user (uses and gratifications), participation
propensity shows it in the long-run rates, and take-a-break prompts not followed cost the session (reactance)."""

from __future__ import annotations

import numpy as np
import pytest

from envs.simulator import FeedSimulator
from rankers.config import HEAD_INDEX, N_KNOBS
from rankers.user_model import UserView


def test_the_worth_of_watching_and_taking_part_differs_by_user_and_averages_one(tiny) -> None:
    sim = FeedSimulator(tiny, 4000, seed=1)
    sim.reset()
    u = sim.users
    assert u.watch_value.mean() == pytest.approx(1.0, abs=0.05)
    assert u.social_value.mean() == pytest.approx(1.0, abs=0.05)
    # one motive moves the two in opposite directions
    assert np.corrcoef(np.log(u.watch_value), np.log(u.social_value))[0, 1] < -0.99
    # the propensity to take part follows the motive, with the configured correlation
    r = np.corrcoef(np.log(u.social_value), u.social)[0, 1]
    assert r == pytest.approx(tiny.users.motive_behaviour_corr, abs=0.05)


def test_off_switches_give_every_user_the_same_weights_and_no_propensity(tiny) -> None:
    off = tiny.with_settings(["users.gratification_spread=0", "users.social_propensity=0", "users.prompt_reactance=0"])
    sim = FeedSimulator(off, 50, seed=1)
    sim.reset()
    assert np.all(sim.users.watch_value == 1.0) and np.all(sim.users.social_value == 1.0)
    assert np.all(sim.users.social == 0.0)


def test_propensity_spreads_like_rates_but_keeps_the_population_rate(tiny) -> None:
    def like_probs(cfg):
        sim = FeedSimulator(cfg, 3000, seed=2)
        sim.reset()
        items = np.random.default_rng(0).integers(0, sim.corpus.catalog.n_items, (3000, 40))
        heads = sim.users.expected_heads(np.arange(3000), items, sim.corpus)
        return heads[..., HEAD_INDEX["p_like"]].mean(axis=1), sim.users.social

    p_on, social = like_probs(tiny)
    p_off, _ = like_probs(tiny.with_settings(["users.social_propensity=0"]))
    assert p_on.mean() == pytest.approx(p_off.mean(), rel=0.15)  # the mean correction of the rare event
    assert np.corrcoef(np.log(p_on), social)[0, 1] > 0.8
    assert np.std(np.log(p_on)) > 1.5 * np.std(np.log(p_off))  # users differ more than their items' appeal does


def test_long_run_rates_reveal_the_propensity(tiny) -> None:
    sim = FeedSimulator(tiny, 64, seed=0)
    sim.reset()
    v = sim.view
    est = ~sim.users.cold
    # established users start from their logged rates, new users from the population's
    assert np.corrcoef(np.log(v.long_rates[est, 0]), sim.users.social[est])[0, 1] > 0.8
    assert np.all(v.long_rates[~est, 0] == v.long_rates[~est, 0][0])
    for _ in range(200):
        res = sim.step(np.zeros((64, N_KNOBS), np.float32))
        ended = res.terminated | res.truncated
        if ended.any():
            sim.reset(ended)
    assert np.corrcoef(np.log(v.long_rates[:, 0]), sim.users.social)[0, 1] > 0.6
    # the observation carries them, by name
    on = ~ended
    assert np.array_equal(res.obs[on][:, sim.layout["user.long_rates"]], v.long_rates[on])


def _feelings_of_three_sessions(cfg) -> np.ndarray:
    """Feelings of three like sessions: not prompted, prompted and carried on, prompted and took the break."""
    sim = FeedSimulator(cfg, 3, seed=0)
    sim.reset()
    u = sim.users
    u.s_videos[:] = 50.0
    u.s_minutes[:] = 30.0
    u.prompted[:] = np.array([False, True, True])
    return u.feeling(np.array([False, False, True]))


def test_a_prompt_not_followed_costs_the_session_reactance(tiny) -> None:
    feel = _feelings_of_three_sessions(tiny)
    r, w = tiny.users.prompt_reactance, tiny.users.w_break_taken
    assert r > 0
    assert feel[1] == pytest.approx(feel[0] - r)  # prompted, carried on
    assert feel[2] == pytest.approx(feel[0] + w)  # prompted, took the break
    f_off = _feelings_of_three_sessions(tiny.with_settings(["users.prompt_reactance=0"]))
    assert f_off[1] == f_off[0]  # off: a prompt costs nothing


def test_a_prompt_seen_is_remembered_and_its_reactance_lowers_long_term_satisfaction(tiny) -> None:
    sim = FeedSimulator(tiny, 64, seed=0)
    sim.reset()
    u = sim.users
    u.compliance[:] = 0.0  # nobody follows a prompt
    s = tiny.pipeline.slate_size
    rand = np.full((64, s, 9), 0.5, np.float32)
    prompt = np.arange(64) % 2 == 0
    item = np.tile(np.arange(s), (64, 1))
    resp = u.respond(item, np.full((64, s), -1), sim.corpus, prompt, rand, np.zeros((64, s), np.float32))
    stayed = ~resp["left"]
    assert np.array_equal(resp["prompted"], prompt & stayed) and np.array_equal(u.prompted, resp["prompted"])
    assert not resp["took_break"].any()
    before = u.long_sat.copy()
    feel = u.feeling(resp["took_break"])
    u.end_session(np.ones(64, bool), resp["took_break"], np.full((64, 3), 0.5, np.float32))
    assert np.allclose(u.long_sat, before + tiny.users.satisfaction_lr * (feel - before))
    # the same session without the prompt felt prompt_reactance better
    u.prompted[:] = False
    seen = prompt & stayed
    assert np.allclose(u.feeling(resp["took_break"])[seen], feel[seen] + tiny.users.prompt_reactance)


def test_the_view_counts_prompts_seen_and_followed() -> None:
    v = UserView(3, 4, 5)
    assert np.all(v.break_take_rate() == 0.5)
    v.record_prompts(np.array([True, True, False]), np.array([True, False, True]))
    v.record_prompts(np.array([True, True, False]), np.array([True, False, False]))
    assert v.prompts.tolist() == [2, 2, 0] and v.breaks.tolist() == [2, 0, 0]
    assert v.break_take_rate() == pytest.approx([0.75, 0.25, 0.5])


def test_break_take_rate_tracks_compliance_when_prompts_come_early(tiny) -> None:
    sim = FeedSimulator(tiny.with_settings(["pipeline.break_after_min=8"]), 64, seed=0)  # tiny's sessions are short
    sim.reset()
    a = np.zeros((64, N_KNOBS), np.float32)
    a[:, -1] = 1.0  # prompt as early as the knob allows
    for _ in range(600):
        res = sim.step(a)
        ended = res.terminated | res.truncated
        if ended.any():
            sim.reset(ended)
    seen = sim.view.prompts >= 3
    assert seen.sum() >= 10
    assert np.corrcoef(sim.view.break_take_rate()[seen], sim.users.compliance[seen])[0, 1] > 0.3


def test_segments_cut_on_the_v5_proxies_as_the_view_holds_them(tiny) -> None:
    from agents.segments import Segmenter

    sim = FeedSimulator(tiny, 64, seed=0)
    obs = sim.reset()
    seg = Segmenter((("like_rate", 0.07), ("break_take_rate", 0.5)))
    s = seg.assign(obs, sim.layout)
    assert np.array_equal(s & 1, (sim.view.long_rates[:, 0] >= np.float32(0.07)).astype(np.int64))
    assert np.all(s >> 1 == 1)  # no prompt seen yet: the prior 0.5 is at the threshold
    assert 0 < (s & 1).sum() < 64
