"""Hidden users: interests, boredom, fatigue, satisfaction, patience, and the response model.

One :class:`Users` holds B users as arrays. :meth:`Users.expected_heads` is the ground truth the
noisy-oracle scorer views; :meth:`Users.respond` samples the response to a slate in order, with
the user possibly leaving mid-slate. Equations and defaults: docs/simulator.md.
"""

from __future__ import annotations

import numpy as np
from scipy.special import ndtr

from envs.config import FeedConfig
from envs.world import Corpus, normalize_rows
from rankers.config import HEAD_INDEX, HEADS
from rankers.hashing import hash_normal, hash_u32, hash_uniform
from rankers.types import Array, take_rows

LOGIT_08 = float(np.log(0.8 / 0.2))
SIGNALS: tuple[str, ...] = ("watch_s", "watch_frac", "complete", "like", "share", "comment", "follow", "skip",
                            "regret", "not_interested", "harmful")


def sigmoid(x: Array) -> Array:
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


class Users:
    """Hidden state of B users (struct of arrays)."""

    #: Attributes with one row per user (:meth:`take`).
    PER_USER: tuple[str, ...] = (
        "long", "session", "boredom", "fatigue", "long_sat", "suscept", "compliance", "rate_mult", "patience", "day",
        "tenure", "cold", "key", "topics", "topic_wts", "n_sessions", "mood", "s_videos", "s_minutes", "s_sat",
        "s_regret", "s_topics", "prompted", "appetite", "recovery_days", "habit", "s_run", "s_peak", "region",
        "language", "bilingual", "watch_value", "social_value", "social")

    def __init__(self, cfg: FeedConfig, n_users: int) -> None:
        b, d, t = n_users, cfg.corpus.emb_dim, cfg.corpus.n_topics
        self.cfg = cfg
        self.long = np.zeros((b, d), np.float32)  # long-term interest
        self.session = np.zeros((b, d), np.float32)  # session interest
        self.boredom = np.zeros((b, t), np.float32)
        self.fatigue = np.zeros(b, np.float32)
        self.long_sat = np.zeros(b, np.float32)  # long-term satisfaction ("temper")
        self.suscept = np.zeros(b, np.float32)  # regret susceptibility
        self.compliance = np.zeros(b, np.float32)  # takes a break when prompted
        self.rate_mult = np.ones(b, np.float32)  # personal return-rate level
        self.patience = np.zeros(b, np.float32)
        self.day = np.zeros(b, np.float32)  # user's clock, days since episode start
        self.tenure = np.zeros(b, np.float32)  # days since signup at episode start
        self.cold = np.zeros(b, bool)
        self.key = np.zeros(b, np.uint32)
        self.topics = np.zeros((b, cfg.users.interest_topics), np.int32)  # the user's interest topics
        self.topic_wts = np.zeros((b, cfg.users.interest_topics), np.float32)  # their weights (0 = unused slot)
        self.appetite = np.zeros(b, np.float32)  # appetite for diverse sessions
        self.recovery_days = np.zeros(b, np.float32)  # satiation recovery time between sessions
        self.habit = np.zeros(b, np.float32)  # habit stock H in [0, 1]
        self.region = np.zeros(b, np.int16)  # CorpusConfig.n_regions: the user's region and language
        self.language = np.zeros(b, np.int16)
        self.bilingual = np.zeros(b, bool)  # also speaks language 0
        self.watch_value = np.ones(b, np.float32)  # what watching and taking part are worth (gratification_spread)
        self.social_value = np.ones(b, np.float32)
        self.social = np.zeros(b, np.float32)  # like/share/comment logit offset (social_propensity)
        self.n_sessions = np.zeros(b, np.int64)  # sessions started in this episode (keys the mood draw)
        self.mood = np.zeros((b, t), np.float32)  # this session's per-topic mood (engagement-logit offset)
        # session accumulators
        self.s_videos = np.zeros(b, np.float32)
        self.s_minutes = np.zeros(b, np.float32)
        self.s_sat = np.zeros(b, np.float32)
        self.s_regret = np.zeros(b, np.float32)
        self.s_topics = np.zeros((b, t), np.float32)
        self.s_run = np.zeros(b, np.float32)  # EMA of this session's per-video satisfaction (its end)
        self.s_peak = np.full(b, -np.inf, np.float32)  # the EMA's maximum so far (its peak)
        self.prompted = np.zeros(b, bool)

    def take(self, rows: Array) -> None:
        """Keeps only the users ``rows`` (the batch shrinks to them, in this order)."""
        take_rows(self, self.PER_USER, rows)

    def draw(self, n: int, rng: np.random.Generator, corpus: Corpus) -> dict[str, Array]:
        """``n`` new users' starting attributes from ``rng`` (what :meth:`reset` assigns), without touching
        the batch."""
        u, d, t = self.cfg.users, self.long.shape[1], corpus.topic_centre.shape[0]
        k = u.interest_topics
        topics = rng.integers(0, t, (n, k))
        n_top = rng.integers(u.interest_topics_min, k + 1, n)  # topic centres this user mixes
        wts = rng.dirichlet(np.ones(k), n) * (np.arange(k)[None, :] < n_top[:, None])
        wts = (wts / wts.sum(axis=1, keepdims=True)).astype(np.float32)
        long = normalize_rows(np.einsum("bk,bkd->bd", wts, corpus.topic_centre[topics])
                          + 0.25 * rng.standard_normal((n, d)))
        span = max(k - u.interest_topics_min, 1)
        z_top = (n_top - (k + u.interest_topics_min) / 2.0) / (span / 2.0)  # in [-1, 1]
        appetite = (u.w_session_diversity + u.diversity_appetite_slope * z_top
                    + u.diversity_appetite_spread * rng.standard_normal(n)).astype(np.float32)
        recovery = (u.satiation_recovery_days * np.exp(0.5 * rng.standard_normal(n))).astype(np.float32)
        susc = rng.beta(2.0, 5.0, n).astype(np.float32)
        comp = rng.beta(2.0 * u.break_compliance / (1 - u.break_compliance + 1e-6), 2.0, n).astype(np.float32)
        rate = np.exp(rng.normal(0.0, 0.4, n)).astype(np.float32)
        cold = rng.random(n) < u.cold_start_share
        tenure = np.where(cold, 0.0, rng.uniform(30, 720, n)).astype(np.float32)
        key = rng.integers(1, 2**32 - 1, n, dtype=np.uint64).astype(np.uint32)
        pat = rng.standard_normal(n).astype(np.float32)
        habit = np.where(cold, 0.0, rng.beta(u.habit_a, u.habit_b, n)).astype(np.float32)
        c = self.cfg.corpus
        region = (hash_u32(key, 221) % np.uint32(c.n_regions)).astype(np.int16)  # keyed: no stream moves
        if c.n_regions > 1:  # each region leans to two topics of its own
            long = normalize_rows(long + u.regional_taste * corpus.region_centre[region])
        g = hash_normal(key, 223).astype(np.float64)  # keyed: no stream moves (uses and gratifications)
        x = u.motive_behaviour_corr * g + np.sqrt(1.0 - u.motive_behaviour_corr ** 2) * hash_normal(key, 224)
        sp, kp = u.gratification_spread, u.social_propensity
        return {"topics": topics, "topic_wts": wts,
                "watch_value": np.exp(-sp * g - sp * sp / 2).astype(np.float32),
                "social_value": np.exp(sp * g - sp * sp / 2).astype(np.float32),
                "social": (kp * x - kp * kp / 2).astype(np.float32), "long": long, "suscept": susc, "compliance": comp,
                "rate_mult": rate, "cold": cold, "tenure": tenure, "key": key, "patience": pat, "appetite": appetite,
                "recovery_days": recovery, "habit": habit, "region": region,
                "language": (region % c.n_languages).astype(np.int16),
                "bilingual": (hash_uniform(key, 222) < u.second_language_share) & (c.n_languages > 1)}

    def reset(self, mask: Array, new: dict[str, Array]) -> None:
        """Starts new users where ``mask``: row r gets row r of ``new`` (:meth:`draw` output, B rows)."""
        u, m = self.cfg.users, mask
        for name, v in new.items():
            if name != "patience":  # a noise: start_session turns it into the patience
                getattr(self, name)[m] = v[m]
        self.boredom[m] = 0.0
        self.fatigue[m] = 0.0
        self.long_sat[m] = u.satisfaction_ref + 0.1
        self.day[m] = 0.0
        self.n_sessions[m] = 0
        self.start_session(m, new["patience"])

    def start_session(self, mask: Array, patience_noise: Array, gap_days: Array | None = None) -> None:
        """Starts a session where ``mask``, ``gap_days`` (B,) after the last one ended (None: a new user)."""
        u = self.cfg.users
        m = mask
        if gap_days is not None:  # satiation recovers and habit lapses over the gap
            gap = np.where(m, gap_days, 0.0)
            if u.satiation_recovery_days > 0:
                keep = np.exp(-gap / np.maximum(self.recovery_days, 1e-3))
            else:
                keep = np.full(gap.shape, 0.3)
            self.boredom[m] *= keep[m, None].astype(np.float32)
            self.habit[m] *= np.exp(-np.maximum(gap - 1.0, 0.0) / u.habit_decay_days)[m].astype(np.float32)
        # Session mood: a per-topic logit offset for this (user, session), counter-based so that it
        # never depends on the policy. The long-term profile cannot see it; in-session adaptation can.
        t = self.boredom.shape[1]
        mood = hash_normal(self.key[:, None], self.n_sessions[:, None], np.arange(t)[None, :], 41)
        self.mood[m] = (u.mood_sd * mood)[m]
        self.session[m] = self.long[m]
        self.n_sessions[m] += 1
        self.fatigue[m] = 0.0
        self.patience[m] = (u.patience_videos * np.exp(0.6 * patience_noise))[m]
        for a in (self.s_videos, self.s_minutes, self.s_sat, self.s_regret, self.s_topics, self.s_run):
            a[m] = 0.0
        self.s_peak[m] = -np.inf
        self.prompted[m] = False

    # ------------------------------------------------------------------ response model
    def _logit(self, users: Array, items: Array, corpus: Corpus, position: Array | float,
               with_mood: bool = True) -> tuple[Array, ...]:
        """Engagement logit z and the attributes used by every signal, for (B', C) items.

        ``with_mood=False`` leaves out the session mood (what the system's models cannot know)."""
        u, cat = self.cfg.users, corpus.catalog
        safe = np.maximum(items, 0)
        interest = normalize_rows((1 - u.session_mix) * self.long[users] + u.session_mix * self.session[users])
        aff = np.einsum("bd,bcd->bc", interest, corpus.true_emb[safe])
        q = corpus.quality[safe]
        hook = corpus.hook[safe]
        top = cat.topic[safe]
        bore = np.take_along_axis(self.boredom[users], top, axis=1)
        mood = np.take_along_axis(self.mood[users], top, axis=1) if with_mood else 0.0
        fresh = np.exp(-np.maximum(cat.world_day - cat.upload_day[safe], 0.0) / 3.0)
        z = (u.w_affinity * aff + u.w_quality * (q - 0.5) + u.w_hook * hook - u.w_boredom * bore
             - u.w_fatigue * self.fatigue[users][:, None] - u.w_position * position
             + u.w_trend * corpus.trend[safe] + u.w_fresh * fresh + mood + u.bias)
        if cat.language is not None and cat.region is not None:  # regions and languages (CorpusConfig)
            lang = cat.language[safe]
            spoken = (lang == self.language[users][:, None]) | ((lang == 0) & self.bilingual[users][:, None])
            local = cat.region[safe] == self.region[users][:, None]
            z = z - u.foreign_language_penalty * ~spoken + u.local_bonus * local
        dur = cat.duration_s[safe]
        zw = z + u.watch_bias + u.w_hook_watch * (hook - 0.25) - u.duration_penalty * np.log(dur / 25.0)
        return z.astype(np.float32), zw.astype(np.float32), aff, q, hook, corpus.risk[safe], dur

    def _cond_probs(self, users: Array, z: Array, aff: Array, q: Array, hook: Array, risk: Array) -> dict[str, Array]:
        u = self.cfg.users
        s = self.suscept[users][:, None]
        so = self.social[users][:, None] if u.social_propensity > 0 else 0.0
        return {
            "skip": sigmoid(u.skip_bias - z),
            "like": sigmoid(u.like_bias + 1.1 * z + 1.0 * q - u.w_hook_like * hook + so),
            "share": sigmoid(u.share_bias + 1.0 * z + 1.5 * q - u.w_hook_like * hook + so),
            "comment": sigmoid(u.comment_bias + 0.8 * z + 1.5 * risk + so),
            "follow": sigmoid(u.follow_bias + 0.9 * z + 1.5 * aff),
            "regret": sigmoid(u.regret_bias + u.regret_hook * hook * (0.5 + s) + u.regret_risk * risk
                              - u.regret_quality * q),
            "not_interested": sigmoid(-2.0 - 3.0 * aff),
        }

    def expected_heads(self, users: Array, items: Array, corpus: Corpus) -> Array:
        """(B',) users, (B', C) items -> (B', C, K) true expected head values (watch_time in s),
        at the first slate position and the users' current state, without the session mood (which
        no model trained on logged history can know; in-session adaptation has to find it)."""
        u = self.cfg.users
        z, zw, aff, q, hook, risk, dur = self._logit(users, items, corpus, 0.0, with_mood=False)
        p = self._cond_probs(users, z, aff, q, hook, risk)
        watch = 1.0 - p["skip"]
        sig = u.watch_noise
        frac = sigmoid(zw / np.sqrt(1.0 + np.pi * sig * sig / 8.0))
        out = np.empty((*items.shape, len(HEADS)), np.float32)
        out[..., HEAD_INDEX["p_complete"]] = watch * ndtr((zw - LOGIT_08) / sig)
        out[..., HEAD_INDEX["p_like"]] = watch * p["like"]
        out[..., HEAD_INDEX["p_share"]] = watch * p["share"]
        out[..., HEAD_INDEX["p_comment"]] = watch * p["comment"]
        out[..., HEAD_INDEX["p_follow"]] = watch * p["follow"]
        out[..., HEAD_INDEX["watch_time"]] = watch * frac * dur + p["skip"] * np.minimum(1.0, dur)
        out[..., HEAD_INDEX["p_skip"]] = p["skip"]
        out[..., HEAD_INDEX["p_regret"]] = watch * p["regret"]
        return out

    def respond(self, item: Array, ad: Array, corpus: Corpus, break_prompt: Array, rand: Array,
                normal: Array) -> dict[str, Array]:
        """Samples the response to a slate (B, S) in order; updates the hidden state.

        ``rand`` (B, S, 9) uniforms and ``normal`` (B, S) normals, drawn whatever the slate, so
        two policies on one seed face the same noise. Returns (B, S) signal arrays plus ``shown``
        and ``left`` (B,) (the user left the session during or after this slate).
        """
        u, cat = self.cfg.users, corpus.catalog
        b, s = item.shape
        all_users = np.arange(b)
        out = {k: np.zeros((b, s), np.float32) for k in SIGNALS}
        out["mute_creator"] = np.zeros((b, s), bool)  # user controls (``UserConfig.controls_share``)
        out["mute_topic"] = np.zeros((b, s), bool)
        shown = np.zeros((b, s), bool)
        present = np.ones(b, bool)
        for j in range(s):
            it = item[:, j : j + 1]
            is_ad = ad[:, j] >= 0
            is_vid = it[:, 0] >= 0
            z, zw, aff, q, hook, risk, dur = (a[:, 0] for a in self._logit(all_users, it, corpus, j / s))
            p = {k: v[:, 0] for k, v in self._cond_probs(all_users, z[:, None], aff[:, None], q[:, None],
                                                            hook[:, None], risk[:, None]).items()}
            r = rand[:, j]
            vid = present & is_vid
            skip = vid & (r[:, 0] < p["skip"])
            watched = vid & ~skip
            frac = np.where(watched, sigmoid(zw + u.watch_noise * normal[:, j]),
                            r[:, 8] * np.minimum(2.0 / dur, 1.0)).astype(np.float32)
            frac = np.where(vid, frac, 0.0)
            sig = {
                "watch_frac": frac,
                "watch_s": frac * dur,
                "complete": watched & (frac > 0.8),
                "like": watched & (r[:, 1] < p["like"]),
                "share": watched & (r[:, 2] < p["share"]),
                "comment": watched & (r[:, 3] < p["comment"]),
                "follow": watched & (r[:, 4] < p["follow"]),
                "skip": skip,
                "regret": watched & (r[:, 5] < p["regret"]),
                "not_interested": skip & (r[:, 6] < p["not_interested"]),
                "harmful": vid & (risk > u.harmful_risk),
            }
            if u.controls_share > 0:  # keyed draws: no random stream moves (0: the default world)
                ni = sig["not_interested"]
                uses = hash_uniform(self.key, 97) < u.controls_share
                pos = self.s_videos.astype(np.int64)
                out["mute_creator"][:, j] = ni & uses & (hash_uniform(self.key, self.n_sessions, pos, 98)
                                                         < u.mute_creator_prob)
                out["mute_topic"][:, j] = ni & uses & (hash_uniform(self.key, self.n_sessions, pos, 99)
                                                       < u.mute_topic_prob)
            for k, v in sig.items():
                out[k][:, j] = v
            # ads: a few seconds, annoyance when irrelevant
            ad_rel = np.einsum("bd,bd->b", self.long, corpus.catalog.ad_emb[np.maximum(ad[:, j], 0)])
            ad_here = present & is_ad
            out["watch_s"][:, j] += np.where(ad_here, 4.0 + 6.0 * np.clip(ad_rel, 0, 1), 0.0)
            shown[:, j] = present & (is_vid | is_ad)
            # satisfaction of this video and the state it leaves
            bore = self.boredom[all_users, cat.topic[np.maximum(it[:, 0], 0)]]
            if u.gratification_spread > 0:  # what watching and taking part are worth to this user
                sat = (np.where(watched, frac * (0.4 + q) * self.watch_value - u.w_boredom_sat * bore, 0.0)
                       + self.social_value * (0.4 * sig["like"] + 0.6 * sig["share"] + 0.3 * sig["follow"]))
            else:
                sat = (np.where(watched, frac * (0.4 + q) - u.w_boredom_sat * bore, 0.0) + 0.4 * sig["like"]
                       + 0.6 * sig["share"] + 0.3 * sig["follow"])
            sat = (sat - 1.2 * sig["regret"] - 0.2 * skip
                   - 0.4 * sig["not_interested"] - 0.5 * sig["harmful"]
                   - np.where(ad_here, u.ad_cost * 0.5 * (1 - np.clip(ad_rel, 0, 1)), 0.0))
            self.s_sat += np.where(shown[:, j], sat, 0.0)
            run = self.s_run + u.peak_end_alpha * (sat - self.s_run)
            self.s_run = np.where(shown[:, j], run, self.s_run).astype(np.float32)
            self.s_peak = np.where(shown[:, j], np.maximum(self.s_peak, self.s_run), self.s_peak).astype(np.float32)
            self.s_regret += sig["regret"]
            self.s_videos += vid
            self.s_minutes += np.where(shown[:, j], (out["watch_s"][:, j] + 1.5) / 60.0, 0.0)
            cost = (1.0 + u.patience_cost_skip * skip + u.patience_cost_regret * sig["regret"]
                    - u.patience_gain_engaged * np.where(watched, frac * (1 + sig["like"]), 0.0)
                    - u.patience_gain_hook * np.where(watched, hook, 0.0)
                    + np.where(ad_here, u.ad_cost, 0.0))
            self.patience -= np.where(shown[:, j], cost, 0.0)
            # interests, boredom, fatigue
            safe = np.maximum(it[:, 0], 0)
            e = corpus.true_emb[safe]
            eng = np.where(watched, frac * (1 + sig["like"] + sig["share"]), 0.0)[:, None]
            self.session = np.where(vid[:, None], normalize_rows(self.session + u.session_drift * eng * e),
                                    self.session)
            self.long = np.where(vid[:, None], normalize_rows(self.long + u.interest_drift * eng * e), self.long)
            self.boredom *= np.where(shown[:, j], 1.0 - u.boredom_decay, 1.0)[:, None].astype(np.float32)
            top = cat.topic[safe]
            self.boredom[all_users[vid], top[vid]] += u.boredom_gain
            self.s_topics[all_users[vid], top[vid]] += 1.0
            self.fatigue += np.where(shown[:, j], u.fatigue_gain, 0.0).astype(np.float32)
            present &= (self.patience > 0) & (r[:, 7] >= u.leave_hazard)
        prompted = present & break_prompt  # the user saw the slate's prompt
        self.prompted |= prompted
        took_break = prompted & (rand[:, -1, 7] < self.compliance)
        out["shown"] = shown
        out["left"] = ~present | took_break
        out["took_break"] = took_break
        out["prompted"] = prompted
        return out

    def end_session(self, mask: Array, took_break: Array, rand: Array,
                    over_days: float = np.inf) -> tuple[Array, Array, Array]:
        """Folds the session into long-term satisfaction; samples the return gap.

        Returns ``gap_days`` (B,) (inf = quit the app), the session's feeling (B,) and the probability,
        before the draw, that the gap exceeds ``over_days`` (B,): with return rate r and quit hazard h
        (competing exponential clocks), ``h / (r + h) + r / (r + h) * exp(-(r + h) * over_days)``.
        """
        feel = self.feeling(took_break)
        long_sat, habit = self.fold(feel)
        self.long_sat = np.where(mask, long_sat, self.long_sat).astype(np.float32)
        self.habit = np.where(mask, habit, self.habit).astype(np.float32)
        rate, hazard = self.clocks(self.long_sat, self.habit)
        gap = -np.log(np.maximum(rand[:, 0], 1e-12)) / rate
        # Competing risks: the app is abandoned for good if the churn clock rings before the return clock.
        t_quit = -np.log(np.maximum(rand[:, 1], 1e-12)) / np.maximum(hazard, 1e-12)
        gap = np.where(t_quit < gap, np.inf, gap).astype(np.float32)
        h = np.maximum(hazard, 1e-12)
        p_over = (h + rate * np.exp(-(rate + h) * over_days)) / (rate + h)
        return gap, feel.astype(np.float32), p_over.astype(np.float32)

    def feeling(self, took_break: Array | bool = False) -> Array:
        """(B,) how the current session felt if it ended now (what :meth:`end_session` folds into L): the mean
        per-video satisfaction mixed with its peak and end (``peak_end``), the user's appetite times the
        session's topic entropy, minus regret and overlong-session penalties, plus a break taken, minus the
        reactance to prompts not followed."""
        u = self.cfg.users
        n = np.maximum(self.s_videos, 1.0)
        t = self.s_topics.shape[1]
        pt = self.s_topics / n[:, None]
        ent = -(pt * np.log(np.where(pt > 0, pt, 1.0))).sum(axis=1) / np.log(t)
        mean = self.s_sat / n
        if u.peak_end > 0:
            peak = np.where(np.isfinite(self.s_peak), self.s_peak, 0.0)
            mean = (1.0 - u.peak_end) * mean + u.peak_end * 0.5 * (peak + self.s_run)
        return (mean + self.appetite * ent - u.w_session_regret * self.s_regret / n
                - u.w_long_session * np.maximum(self.s_minutes - 60.0, 0.0) / 60.0
                + u.w_break_taken * np.asarray(took_break, np.float32)
                - u.prompt_reactance * (self.prompted & ~np.asarray(took_break, bool))).astype(np.float32)

    def fold(self, feel: Array) -> tuple[Array, Array]:
        """(B,) long-term satisfaction and habit once the current session, felt as ``feel``, is folded in
        (without changing the state): ``L + satisfaction_lr (feel - L)`` and one habit repetition."""
        u = self.cfg.users
        long_sat = self.long_sat + u.satisfaction_lr * (feel - self.long_sat)
        habit = self.habit + u.habit_gain * np.minimum(self.s_minutes / u.habit_minutes, 1.0) * (1.0 - self.habit)
        return long_sat, habit

    def clocks(self, long_sat: Array, habit: Array) -> tuple[Array, Array]:
        """(B,) return rate (sessions a day) and quit hazard (a day) of users with long-term satisfaction
        ``long_sat`` and habit ``habit``: satisfaction moves both, less so for habitual users
        (``habit_insensitivity``); habit raises the return rate and lowers the hazard; new users (first week
        after signup) quit ``cold_churn_mult`` times as readily."""
        u = self.cfg.users
        rel = (long_sat - u.satisfaction_ref) * (1.0 - u.habit_insensitivity * habit)
        dh = habit - u.habit_ref
        rate = u.sessions_per_day * self.rate_mult * np.exp(u.return_sensitivity * rel + u.habit_return * dh)
        new_user = self.cold & (self.tenure + self.day < 7.0)
        hazard = (u.churn_hazard * np.exp(-u.churn_sensitivity * rel - u.habit_churn * dh)
                  * np.where(new_user, u.cold_churn_mult, 1.0))
        return rate, hazard
