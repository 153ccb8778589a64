"""World and environment configuration, with the named presets ``tiny``, ``small``, ``default``, ``large``.

Each field's docstring gives its meaning; docs/simulator.md gives the equation it enters and where
the default comes from. Configs are frozen and validated on construction: a wrong value raises a
``ValueError`` that names the field and the rule.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from rankers.config import LEARNED_PIPELINE, PipelineConfig, check_value, checked_field, replace_nested, validate_fields

ENV_VERSION = "v5"
"""Dynamics version recorded in checkpoints and datasets (a mismatch is refused). v5: users differ in what the knobs
do for them: what watching and taking part are worth (``gratification_spread``; uses and gratifications) with its
observable proxy, a per-user participation propensity (``social_propensity``) seen in the long-run like and share
rates (``user.long_rates``); and reactance to take-a-break prompts not followed (``prompt_reactance``), with the
share of prompts followed observed (``user.break_take_rate``). v4: v3 re-calibrated against
the targets of docs/simulator.md (shorter formats, lower watch, engagement and like intercepts) and habit formed
at the pace Lally et al. 2010 measured (``habit_gain`` 0.2 -> 0.03); no new mechanism. v3: state-dependent users
(habit stock, per-user diversity appetite, satiation that recovers with the gap between sessions, peak-end
session feeling; docs/simulator.md "State-dependence"), the observation's visit rate and history topic
entropy, established users' logged topic history in the system's view. v2: a user's random numbers
are keyed by the user and their request / session of the episode (``FeedSimulator._noise``), not drawn per
batch step. v1: sessions recalibrated (patience, session mood), real-time adaptation kept by the
pure-engagement baseline."""
REWARD_MODES = ("retention", "engagement", "composite", "churn", "churn_expected", "return_time")


@dataclass(frozen=True)
class CorpusConfig:
    """Videos, creators, ads."""

    n_videos: int = checked_field(100_000, min=100)
    n_topics: int = checked_field(24, min=5)
    emb_dim: int = checked_field(16, min=2)
    topic_spread: float = checked_field(0.55, min=0.0)
    """Std of a video's true embedding around its topic centre (before normalisation)."""
    videos_per_creator: float = checked_field(25.0, min=1.0)
    n_formats: int = checked_field(4, min=1)
    format_duration_s: tuple[float, ...] = (4.0, 8.0, 15.0, 30.0)
    """Median duration of each format (short clip, standard, long, mini-doc); calibrated (env v4: was 5, 10, 20, 40 s)
    so that the weighted-sum baseline watches ~17 s per video and ~30 minutes a session."""
    new_creator_share: float = checked_field(0.35, min=0.0, max=1.0)
    """Share of creators that are new (< 30 days or < 1000 followers) at the start."""
    new_creator_days: float = checked_field(30.0, gt=0.0)
    new_creator_followers: float = checked_field(1000.0, gt=0.0)
    upload_rate: float = checked_field(0.0004, min=0.0, max=0.1)
    """New uploads per day as a share of the corpus (seed: 2M a day on a 5B library = 0.0004)."""
    upload_capacity: float = checked_field(0.25, min=0.0, max=2.0)
    """Extra item slots for uploads, as a share of n_videos; when full, the oldest videos retire."""
    trending_bursts_per_day: float = checked_field(3.0, min=0.0)
    trend_half_life_days: float = checked_field(1.0, gt=0.0)
    trend_strength: float = checked_field(1.2, min=0.0)
    promoted_share: float = checked_field(0.005, min=0.0, max=0.1)
    n_ads: int = checked_field(64, min=1)
    estimate_noise: float = checked_field(0.08, min=0.0)
    """Noise of the system's content models (embedding, quality and risk estimates)."""
    creator_starve_days: float = checked_field(7.0, gt=0.0)
    """A new creator whose videos get no views for this long halves its upload rate (and stops below 10 %)."""
    bot_rings_per_day: float = checked_field(0.0, min=0.0)
    """Engagement rings started per day (seed 000: malicious or noisy signals). A ring of bot accounts inflates
    one target video's counters for ``bot_ring_days``: views, likes and shares without completions (bots do not
    watch), at ``bot_ring_strength`` times a genuine trending burst's engagement velocity, so the target rises in
    the trending lists. Rings target uploads of the last 3 days; ``bot_low_quality_share`` of them a low-quality
    or risky one (quality < 0.3 or risk > 0.3), the rest any (a paid promotion). Fake engagement of this kind
    is sold in bulk and shows as like bursts without watch time (De Cristofaro et al. 2014, Facebook like
    farms; Ikram et al. 2017, collusion networks). 0 (default): no bots, the world is exactly the default world's."""
    n_regions: int = checked_field(1, min=1, max=64)
    """Regions and languages (seed 001: 100+ languages and cultural contexts, trending per geo and language).
    Creators have a region (a keyed draw) and mostly its language (region ``r`` speaks language ``r % L``; 15 %
    of creators another); users have a region, its language and, ``second_language_share`` of them, language 0
    as a second one. A video in a language the user does not speak loses ``foreign_language_penalty`` of
    engagement logit (Hale 2014: users interact mostly within their language); a video from the user's region
    gains ``local_bonus`` (cultural proximity, Straubhaar 1991), and each region leans to two topics of its own
    (``regional_taste``). 1 region and 1 language (default): none of it, the world is exactly the default world's."""
    n_languages: int = checked_field(1, min=1, max=64)
    bot_ring_days: float = checked_field(1.0, gt=0.0)
    bot_ring_strength: float = checked_field(10.0, min=0.0)
    bot_low_quality_share: float = checked_field(0.6, min=0.0, max=1.0)

    def __post_init__(self) -> None:
        validate_fields(self)
        check_value(all(d > 0 for d in self.format_duration_s), "CorpusConfig", "format_duration_s",
               self.format_duration_s, "durations > 0 seconds")
        if len(self.format_duration_s) != self.n_formats:
            raise ValueError(f"CorpusConfig.format_duration_s has {len(self.format_duration_s)} entries, "
                             f"expected n_formats={self.n_formats}")


@dataclass(frozen=True)
class UserConfig:
    """The hidden user model: interests, mood, boredom, fatigue, satisfaction, patience, return, churn.

    Defaults are calibrated (docs/simulator.md, "Calibration") so that the weighted-sum baseline on the
    ``small`` and ``default`` presets shows the seed's session (about 30 minutes and 100 videos) and
    plausible per-view rates.
    """

    cold_start_share: float = checked_field(0.3, min=0.0, max=1.0)
    """Share of users who just signed up and have no history."""
    interest_topics: int = checked_field(3, min=1)
    """Long-term interest = mixture of up to this many topic centres (each user draws how many, uniformly from
    ``interest_topics_min`` to this)."""
    interest_topics_min: int = checked_field(1, min=1)
    """Fewest topic centres in a user's long-term interest (a focused user)."""
    interest_drift: float = checked_field(0.004, min=0.0, max=1.0)
    """Long-term interest moves toward an engaged video by this step (filter-bubble pressure)."""
    session_drift: float = checked_field(0.05, min=0.0, max=1.0)
    session_mix: float = checked_field(0.35, min=0.0, max=1.0)
    """Weight of the session interest against the long-term interest in affinity."""
    mood_sd: float = checked_field(1.6, min=0.0)
    """Session mood: each (user, session, topic) gets an engagement-logit offset ~ N(0, mood_sd) (counter-based
    hash, so the same for every policy). Invisible to the long-term profile; in-session adaptation can learn it."""
    boredom_gain: float = checked_field(0.03, min=0.0)
    boredom_decay: float = checked_field(0.02, min=0.0, max=1.0)
    """Per-video decay of every topic's boredom; between sessions boredom keeps 30 %."""
    fatigue_gain: float = checked_field(0.004, min=0.0)
    # response model (logit coefficients)
    w_affinity: float = 3.0
    w_quality: float = 1.5
    w_hook: float = 1.6
    w_boredom: float = 0.6
    w_fatigue: float = 1.0
    w_position: float = 0.15
    w_trend: float = 0.8
    w_fresh: float = 0.3
    bias: float = -1.9
    """Intercept of the engagement logit z (sets the skip rate: P(skip) = sigmoid(skip_bias - z))."""
    skip_bias: float = -1.0
    watch_bias: float = -0.1
    """Shift of the watch-fraction logit of a video that is not skipped (sets the completion rate)."""
    watch_noise: float = checked_field(0.9, gt=0.0)
    duration_penalty: float = 0.2
    w_hook_watch: float = 2.0
    """Clickbait: hook raises the watch-fraction logit beyond its effect on z (watched to the end, rarely liked)."""
    w_hook_like: float = 1.5
    """Hook lowers the like/share logits by this much per unit (likes and shares follow quality)."""
    like_bias: float = -4.7
    share_bias: float = -6.7
    comment_bias: float = -5.3
    follow_bias: float = -7.1
    # satisfaction and leaving
    regret_hook: float = 5.0
    regret_risk: float = 2.5
    regret_quality: float = 2.0
    regret_bias: float = -3.4
    harmful_risk: float = checked_field(0.7, min=0.0, max=1.0)
    """A video with true risk above this is a harmful exposure."""
    patience_videos: float = checked_field(80.0, gt=0.0)
    """Median session patience, in videos of average experience."""
    patience_cost_skip: float = 1.0
    patience_cost_regret: float = 0.5
    """A regretted video costs a little patience; regret mostly acts later, on return (end_session)."""
    patience_gain_engaged: float = 0.6
    patience_gain_hook: float = 1.0
    """Compulsion: a watched video refunds ``patience_gain_hook * hook`` patience, so hook-heavy
    (clickbait) feeds make sessions longer now while their regret lowers the return rate later."""
    leave_hazard: float = checked_field(0.002, min=0.0, max=1.0)
    ad_cost: float = 0.6
    break_compliance: float = checked_field(0.5, min=0.0, max=1.0)
    """Mean probability that a user takes the break when prompted."""
    # return between sessions
    sessions_per_day: float = checked_field(1.5, gt=0.0)
    """Return rate (sessions a day) of a user whose long-term satisfaction equals ``satisfaction_ref``."""
    return_sensitivity: float = 1.6
    """Return rate multiplier is exp(return_sensitivity * (long-term satisfaction - reference))."""
    satisfaction_ref: float = 0.65
    satisfaction_lr: float = checked_field(0.3, min=0.0, max=1.0)
    w_session_diversity: float = 0.4
    """Mean appetite for diversity: the session feeling gains ``appetite * topic entropy`` (per user, below)."""
    diversity_appetite_slope: float = 0.8
    """Per-user diversity appetite = ``w_session_diversity + slope * (k - mean k) / sd k + spread * N(0, 1)``
    with ``k`` the user's number of interest topics: broad users like varied sessions, focused users dislike
    them (Kapoor et al. 2015; Di Noia et al. 2017). Its observable proxy is the topic entropy of the user's
    history."""
    diversity_appetite_spread: float = checked_field(0.2, min=0.0)
    satiation_recovery_days: float = checked_field(0.5, min=0.0)
    """Median days for a topic's boredom to recover by a factor e between sessions (per user, LogNormal with
    sd 0.5: Leqi et al. 2021, rebounding satiation). 0 = the v2 rule: boredom keeps 30 % at every session
    start, whatever the gap."""
    peak_end: float = checked_field(0.5, min=0.0, max=1.0)
    """Weight of the session's peak and end in its feeling (Kahneman et al. 1993, peak-end rule):
    ``feel_mean = (1 - peak_end) mean sat + peak_end (peak + end) / 2`` over an EMA of per-video satisfaction
    (``peak_end_alpha``). 0 = the mean alone (v2)."""
    peak_end_alpha: float = checked_field(0.1, gt=0.0, max=1.0)
    """EMA step of the running per-video satisfaction whose maximum is the peak and whose last value the end."""
    controls_share: float = checked_field(0.0, min=0.0, max=1.0)
    """Share of users who use the mute controls (a keyed per-user draw). Such a user's "not interested" tap
    also mutes the video's creator with ``mute_creator_prob`` and its topic with ``mute_topic_prob``; the
    pipeline serves nothing muted from the next request on (``rankers.user_model.UserView.mute``). Users do use
    such controls and they change what is served (Ricks & McCrosky 2022, Mozilla's study of YouTube's "Don't
    recommend channel" and "Not interested"). 0 (default): nobody mutes (the default world)."""
    second_language_share: float = checked_field(0.3, min=0.0, max=1.0)
    """Users who also speak language 0 (``CorpusConfig.n_regions``)."""
    foreign_language_penalty: float = checked_field(2.0, min=0.0)
    local_bonus: float = checked_field(0.3, min=0.0)
    regional_taste: float = checked_field(0.6, min=0.0)
    """Pull of a user's interests toward their region's two topics (before normalisation)."""
    mute_creator_prob: float = checked_field(0.5, min=0.0, max=1.0)
    mute_topic_prob: float = checked_field(0.2, min=0.0, max=1.0)
    habit_gain: float = checked_field(0.03, min=0.0, max=1.0)
    """Habit stock H in [0, 1] (Lally et al. 2010: automaticity grows asymptotically with repetitions):
    after each session ``H += habit_gain * min(minutes / habit_minutes, 1) * (1 - H)``. 0 = no habit (v2).
    0.03 (env v4; v3: 0.2): Lally et al.'s median participant reached 95 % of their automaticity plateau after 66
    days of daily repetition, ``1 - 0.05 ** (1 / 99) = 0.03`` per session at 1.5 sessions a day."""
    habit_minutes: float = checked_field(20.0, gt=0.0)
    """Session minutes that give a full repetition of the habit."""
    habit_decay_days: float = checked_field(5.0, gt=0.0)
    """Habit decays over a lapse: ``H *= exp(-max(gap - 1 day, 0) / habit_decay_days)`` at a return."""
    habit_return: float = 1.0
    """Return rate multiplier ``exp(habit_return * (H - habit_ref))``; churn hazard ``exp(-habit_churn * (H -
    habit_ref))`` (RLUR's activity levels: active users return sooner and churn less)."""
    habit_churn: float = 2.0
    habit_ref: float = checked_field(0.5, min=0.0, max=1.0)
    habit_insensitivity: float = checked_field(0.7, min=0.0, max=1.0)
    """Habits are insensitive to outcome value (Dickinson 1985; Wood & Rünger 2016): the sensitivity of return
    and churn to satisfaction is multiplied by ``1 - habit_insensitivity * H``."""
    habit_a: float = checked_field(2.0, gt=0.0)
    """Established users' habit at the start ~ Beta(habit_a, habit_b); new users start at 0."""
    habit_b: float = checked_field(2.0, gt=0.0)
    gratification_spread: float = checked_field(0.5, min=0.0)
    """Uses and gratifications (Katz, Blumler & Gurevitch 1973; on TikTok: Omar & Dequan 2020, Bossen & Kottasz
    2020): users come to watch (entertainment, escapism) or to take part (social interaction), and what satisfies
    them differs. Per user a motive ``g ~ N(0, 1)`` (keyed); the per-video satisfaction weighs its watching term
    by ``exp(-spread g - spread^2 / 2)`` and its interaction terms (like, share, follow) by ``exp(spread g -
    spread^2 / 2)``, both 1 on average over users. What a head predicts is unchanged; what its prediction is
    worth to the user is not, so the best head weights depend on the user. 0 = every user weighs them alike (v4)."""
    social_propensity: float = checked_field(1.0, min=0.0)
    """Participation follows the motive (Omar & Dequan 2020: the social-interaction motive predicts liking,
    sharing and commenting): like, share and comment logits gain ``social_propensity * x - social_propensity^2 /
    2`` with ``x = motive_behaviour_corr * g + sqrt(1 - motive_behaviour_corr^2) N(0, 1)`` (keyed), the mean
    correction keeping the population's rates of these rare events about where they were (exact for rare events;
    likes 7.2 % -> 7.0 % on the calibration probe). The observable proxy of the motive is the user's long-run like
    and share rates (``user.long_rate_like``, ``user.long_rate_share``). 0 = no per-user propensity (v4)."""
    motive_behaviour_corr: float = checked_field(0.5, min=0.0, max=1.0)
    """Correlation between the motive ``g`` and the participation propensity ``x``."""
    prompt_reactance: float = checked_field(0.1, min=0.0)
    """Psychological reactance (Brehm 1966; Steindl et al. 2015): a prompt the user does not want to follow is
    felt as pressure, and users of digital well-being tools dismiss and resent such interruptions (Monge
    Roffarello & De Russis 2019; Lyngs et al. 2019). A session in which the user was prompted to take a break and
    did not take it feels ``prompt_reactance`` worse. Users differ in compliance (per user, Beta, mean
    ``break_compliance``), and the system sees the share of prompts each user followed (``user.break_take_rate``),
    so when to prompt depends on the user. 0 = prompts cost nothing (v4)."""
    w_session_regret: float = 2.5
    w_boredom_sat: float = 0.4
    """Satisfaction lost per unit of boredom of a watched video's topic (narrow feeds feel worse)."""
    w_long_session: float = 0.5
    """Well-being: penalty per hour of session beyond one hour."""
    w_break_taken: float = 0.1
    churn_hazard: float = checked_field(0.015, min=0.0)
    """Daily hazard of leaving the app for good at the reference satisfaction; it competes with the return
    clock, so P(quit before the next visit) = h / (h + return rate)."""
    churn_sensitivity: float = 4.0
    """Churn hazard is ``churn_hazard * exp(-churn_sensitivity * (long-term satisfaction - reference))``."""
    cold_churn_mult: float = checked_field(2.0, min=0.0)
    """Churn hazard multiplier of users in their first week after signup (new users churn more)."""

    def __post_init__(self) -> None:
        validate_fields(self)
        check_value(self.interest_topics_min <= self.interest_topics, "UserConfig", "interest_topics_min",
               self.interest_topics_min, f"<= interest_topics={self.interest_topics}")


@dataclass(frozen=True)
class RewardConfig:
    """Reward modes: ``retention`` (a return visit within the horizon = 1), ``engagement``
    (watch minutes), ``composite`` (a weighted sum of both and the signals below), ``churn`` (-1 when the
    user churns, else 0: undiscounted, the return is minus the churn flag, so its expectation is 30-day
    retention - 1 whatever the number of requests a session takes; ``retention`` counts return visits per
    request, which a policy can raise by shortening sessions), ``churn_expected`` (at each session end,
    minus the probability that the user churns there, given the hidden state before the draw: the same
    expected return as ``churn`` with far less variance, a simulator-side training signal for tuners and
    agents; evaluation is always on the realised outcomes)."""

    mode: str = checked_field("retention", choices=REWARD_MODES)
    w_return: float = 1.0
    w_watch_min: float = 0.05
    w_like: float = 0.0
    w_share: float = 0.0
    w_regret: float = -0.1

    def __post_init__(self) -> None:
        validate_fields(self)


@dataclass(frozen=True)
class FeedConfig:
    """Everything an environment needs. ``preset`` names where the defaults came from."""

    preset: str = "default"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    users: UserConfig = field(default_factory=UserConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    horizon_days: float = checked_field(30.0, gt=0.0)
    churn_days: float = checked_field(7.0, gt=0.0)
    """No return within this many days ends the episode as churn (terminated)."""
    world_days_per_step: float = checked_field(1.0 / 15.0, gt=0.0)
    """World clock (uploads, trends, creators) advance per batched step: about one user's pace."""
    population: float = checked_field(2000.0, gt=0.0)
    """Platform users the simulated batch stands for in engagement counters and creator growth."""
    max_steps: int = checked_field(5000, min=1)
    """Safety cap on requests per episode (truncates)."""

    def __post_init__(self) -> None:
        validate_fields(self)
        c, u, p = self.corpus, self.users, self.pipeline
        check_value(u.interest_topics <= c.n_topics, "UserConfig", "interest_topics", u.interest_topics,
               f"<= corpus.n_topics ({c.n_topics})")
        check_value(p.min_topics <= c.n_topics, "PipelineConfig", "min_topics", p.min_topics,
               f"<= corpus.n_topics ({c.n_topics})")
        check_value(p.n_interest <= c.n_videos, "PipelineConfig", "n_interest", p.n_interest,
               f"<= corpus.n_videos ({c.n_videos})")

    def replace(self, **changes: Any) -> FeedConfig:
        """A copy with fields replaced; nested configs accept dicts (``users={"w_hook": 2.0}``, at any depth); an
        unknown name raises ``ValueError`` naming it (:func:`rankers.config.replace_nested`)."""
        return replace_nested(self, changes)

    def with_settings(self, assignments: Sequence[str]) -> FeedConfig:
        """A copy with ``"path=value"`` assignments applied (``"users.watch_bias=-0.1"``,
        ``"corpus.format_duration_s=[4, 8, 15, 30]"``): the path is dotted, the value JSON where it parses, else a
        string. A malformed assignment or an unknown field raises ``ValueError`` naming it."""
        changes: dict[str, Any] = {}
        for text in assignments:
            path, eq, raw = text.partition("=")
            if not eq or not path.strip():
                raise ValueError(f"setting {text!r} is malformed: write PATH=VALUE, e.g. users.watch_bias=-0.1")
            value = setting_value(raw)
            *heads, last = path.strip().split(".")
            node = changes
            for h in heads:
                node = node.setdefault(h, {})
                if not isinstance(node, dict):
                    raise ValueError(f"setting {text!r} conflicts with an earlier one for {h!r}")
            if last in node:
                raise ValueError(f"setting {text!r} repeats {path.strip()!r}: give each parameter once")
            node[last] = value
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> dict[str, Any]:
        """The full config as JSON types (tuples become lists), as checkpoints and datasets store it."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FeedConfig:
        """Rebuilds a config saved by :meth:`to_json`. Fields it lacks (saved before they existed) take their
        defaults; a field this code does not know raises ``ValueError`` naming it."""
        def build(kind: Any, data: dict[str, Any], where: str) -> Any:
            known = {f.name: f for f in dataclasses.fields(kind)}
            unknown = sorted(set(data) - set(known))
            if unknown:
                names = ", ".join(where + k for k in unknown)
                raise ValueError(f"saved config has fields this code does not know: {names}")
            kw: dict[str, Any] = {}
            for k, v in data.items():
                f = known[k]
                proto = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                if dataclasses.is_dataclass(proto) and isinstance(v, dict):
                    kw[k] = build(type(proto), v, f"{where}{k}.")
                else:
                    kw[k] = tuple(v) if isinstance(v, list) else v
            return kind(**kw)

        return build(cls, d, "")

    def differences(self, stored: dict[str, Any], limit: int = 8) -> str:
        """Empty if ``stored`` (a config as saved by :meth:`to_json`) equals this config; otherwise the
        differing fields, ``"users.mood_sd: stored=1.4 here=1.6; ..."`` (at most ``limit`` named)."""
        have, want = _flatten(stored), _flatten(self.to_json())
        diff = sorted(k for k in set(have) | set(want) if have.get(k, "<missing>") != want.get(k, "<missing>"))
        shown = "; ".join(f"{k}: stored={have.get(k, '<missing>')!r} here={want.get(k, '<missing>')!r}"
                          for k in diff[:limit])
        return shown + (f" (+{len(diff) - limit} more)" if len(diff) > limit else "")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


#: The user population of the ``*-shift`` presets: the same corpus and pipeline, users no agent was trained
#: on. More of them are new, they are more susceptible to clickbait and regret, less patient, moodier,
#: narrower in interest and quicker to leave when unhappy. For out-of-distribution evaluation.
SHIFTED_USERS: dict[str, Any] = {
    "cold_start_share": 0.45, "interest_topics": 2, "mood_sd": 2.0, "w_hook": 2.0, "regret_hook": 6.0,
    "patience_videos": 65.0, "sessions_per_day": 1.2, "return_sensitivity": 2.0, "churn_hazard": 0.02,
    "w_session_regret": 3.0, "boredom_gain": 0.04,
}


def _preset(name: str) -> FeedConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {PRESETS}")
    if name.endswith("-shift"):
        base = _preset(name.removesuffix("-shift"))
        return base.replace(preset=name, users=SHIFTED_USERS)
    if name == "tiny":
        return FeedConfig(
            preset="tiny",
            corpus=CorpusConfig(n_videos=2_000, n_topics=12, emb_dim=8),
            pipeline=PipelineConfig(n_interest=150, n_following=30, n_trending=40, n_new_creator=60, n_serendipity=40,
                                    n_prerank=160, n_rank=80, pool_quota_new_creator=12, pool_quota_serendipity=8),
            horizon_days=7.0, churn_days=3.0, population=200.0,
        )
    if name == "small":
        return FeedConfig(
            preset="small",
            corpus=CorpusConfig(n_videos=20_000, n_topics=16, emb_dim=16),
            pipeline=PipelineConfig(n_interest=500, n_following=100, n_trending=100, n_new_creator=200,
                                    n_serendipity=100, n_prerank=300, **LEARNED_PIPELINE),
            population=1000.0,
        )
    if name == "default":
        return FeedConfig(preset="default", pipeline=PipelineConfig(**LEARNED_PIPELINE))
    if name == "large":
        return FeedConfig(
            preset="large",
            corpus=CorpusConfig(n_videos=10_000_000, n_topics=64, emb_dim=32),
            pipeline=PipelineConfig(n_interest=5000, n_following=1000, n_trending=1000, n_new_creator=2000,
                                    n_serendipity=1000, index="ivf", ivf_nlist=4096, ivf_nprobe=16),
            population=100_000.0,
        )
    raise ValueError(f"unknown preset {name!r}: choose one of {PRESETS}")


PRESETS: tuple[str, ...] = ("tiny", "small", "default", "large", "tiny-shift", "small-shift", "default-shift")
"""World presets. ``small`` and ``default`` serve with the learned pipeline (:data:`rankers.config.LEARNED_PIPELINE`:
two-tower retrieval, learned pre-ranker and multi-task ranker, trained on the world's own logs and cached on first use
by :mod:`offline_data.provision`); ``tiny`` and ``large`` with the noisy-oracle pipeline (no trained models).
``<name>-shift``: the same corpus and pipeline as ``<name>`` with another user population (:data:`SHIFTED_USERS`),
never used for training agents: evaluation under user shift (its rankers are trained on its own logs, as a
production system retrains on the population it serves)."""


def setting_value(text: str) -> Any:
    """A setting's value as written on a command line: JSON where it parses (``"3"`` -> 3, ``"[4, 8]"`` -> a list,
    ``"true"`` -> True), else the string itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def make_config(preset: str = "default", **overrides: Any) -> FeedConfig:
    """The named preset with ``overrides`` applied (nested sections accept dicts)."""
    cfg = _preset(preset)
    return cfg.replace(**overrides) if overrides else cfg
