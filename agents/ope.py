"""Off-policy evaluation of a policy from logged data, before it is run.

Estimators of the (truncated, discounted) value ``V = E[sum_{t<H} gamma^t r_t]`` of a target policy
over the first H requests of a user's episode, from trajectories logged by a behaviour policy with
recorded log-propensities: per-decision importance sampling (IS), weighted per-decision IS (WIS),
doubly robust (DR, Jiang & Li 2016) with a fitted Q-function, and fitted-Q evaluation (FQE).

Target propensities (:func:`build_trajectories`):

- a deterministic knob policy is a delta, so for IS/WIS/DR it is smoothed into a truncated normal
  ``N(pi(s), sigma^2)`` on [-1, 1] per knob (the family of the behaviour ``GaussianKnobs``, exact
  density by ``scipy.stats.truncnorm``). IS/WIS/DR then estimate the *smoothed* policy; state the
  sigma with the estimate. FQE evaluates the deterministic policy itself.
- a stochastic policy with a ``log_prob(obs, action)`` method (e.g. :class:`SampledPolicy` around a
  behaviour policy) or ``RandomKnobs`` (uniform on [-1, 1]^A) uses its exact density.
- on discrete (preset) data every target is epsilon-greedy around the preset nearest to ``pi(s)``
  (:func:`greedy_logp`).

FQE (:func:`fit_fqe`) is implemented here with torch rather than ``d3rlpy.ope.FQE``: d3rlpy's FQE
needs a d3rlpy algorithm as the target (it calls ``algo.impl.predict_best_action`` on torch tensors),
is stationary and bootstraps through timeouts (so it estimates an infinite-horizon value, not the
H-request value), and cannot serve the true-scores policy, whose actions depend on hidden user state. Here Q takes
the remaining horizon as an input, ``Q(s, a, h)`` with ``Q(., ., 0) = 0``, and is fitted by iterated
regression on ``r + gamma * Q(s', pi(s'), h - 1)`` with the target's actions at every logged next
state given in advance (:class:`TargetActions`), so it works for every ``Policy``: observation-only
policies are called on the logged observations, simulator-bound ones (the true-scores policy) through an exact
replay of the logging run (:func:`replay_target_actions`).

The on-policy truth (:func:`on_policy_returns`) runs the target in ``FeedSimulator(cfg, n_users, seed)``
on the dataset's seed, so it meets the same users as the logged episodes (common random numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from rankers.config import N_KNOBS
from rankers.types import Array

if TYPE_CHECKING:
    from agents.policies import Policy
    from envs.config import FeedConfig
    from offline_data.dataset import LoggedDataset


@dataclass(frozen=True)
class Trajectories:
    """Logged episodes padded to (E, H); ``mask`` marks real steps."""

    rewards: Array  # (E, H) float64
    mask: Array  # (E, H) bool
    behaviour_logp: Array  # (E, H) float64 log mu(a_t | s_t)
    target_logp: Array  # (E, H) float64 log pi(a_t | s_t)
    rows: Array | None = None  # (E, H) int64 row of each step in the logged transitions, -1 = padding

    @property
    def n_episodes(self) -> int:
        return int(self.rewards.shape[0])


def pad_episodes(episode: Array, step: Array, values: dict[str, Array], horizon: int) -> dict[str, Array]:
    """Flat logged arrays (M,) with episode ids and step indices -> (E, H) arrays (+ ``mask``),
    keeping steps < ``horizon``."""
    ids, e_idx = np.unique(episode, return_inverse=True)
    keep = step < horizon
    out = {"mask": np.zeros((ids.size, horizon), bool)}
    out["mask"][e_idx[keep], step[keep]] = True
    for k, v in values.items():
        arr = np.zeros((ids.size, horizon), np.float64)
        arr[e_idx[keep], step[keep]] = v[keep]
        out[k] = arr
    return out


def _discounts(h: int, gamma: float) -> Array:
    return gamma ** np.arange(h, dtype=np.float64)


def _cum_weights(tr: Trajectories, clip: float | None, carry: bool = False) -> Array:
    """(E, H) cumulative weights ``w_{0:t}``; zero after an episode's end, or with ``carry`` held at the
    final value there (an ended episode sits in an absorbing state with reward 0, where every policy
    agrees), which is what WIS must normalise by when episodes have different lengths."""
    logw = np.cumsum(np.where(tr.mask, tr.target_logp - tr.behaviour_logp, 0.0), axis=1)
    w = np.exp(np.minimum(logw, 700.0))
    if clip is not None:
        w = np.minimum(w, clip)
    if carry:
        return np.where(tr.mask.any(axis=1, keepdims=True), w, 0.0)
    return np.where(tr.mask, w, 0.0)


def per_decision_is(tr: Trajectories, gamma: float, clip: float | None = None) -> float:
    """PDIS: mean over episodes of ``sum_t gamma^t w_{0:t} r_t``."""
    w = _cum_weights(tr, clip)
    return float((w * tr.rewards * _discounts(tr.rewards.shape[1], gamma)).sum(axis=1).mean())


def weighted_is(tr: Trajectories, gamma: float, clip: float | None = None) -> float:
    """Weighted PDIS: the cumulative weights at each t are normalised over episodes (episodes that
    already ended count with their final weight and reward 0, so unequal lengths are not biased)."""
    w = _cum_weights(tr, clip, carry=True)
    norm = w.sum(axis=0)
    wn = np.where(norm > 0, w / np.where(norm > 0, norm, 1.0), 0.0)
    return float((wn * np.where(tr.mask, tr.rewards, 0.0) * _discounts(tr.rewards.shape[1], gamma)).sum())


def doubly_robust(tr: Trajectories, q_logged: Array, v_target: Array, gamma: float, clip: float | None = None) -> float:
    """DR (Jiang & Li 2016): ``sum_t gamma^t [w_t (r_t - q(s_t,a_t)) + w_{t-1} v(s_t)]``.

    Args:
        q_logged: (E, H) fitted Q of the logged actions.
        v_target: (E, H) fitted value of the target policy, ``Q(s_t, pi(s_t))``.
    """
    w = _cum_weights(tr, clip)
    w_prev = np.concatenate([np.ones((w.shape[0], 1)), w[:, :-1]], axis=1) * tr.mask
    terms = w * (tr.rewards - q_logged) + w_prev * v_target
    return float((np.where(tr.mask, terms, 0.0) * _discounts(w.shape[1], gamma)).sum(axis=1).mean())


def gaussian_logp(action: Array, mean: Array, sigma: float) -> Array:
    """(M, A) actions under independent ``N(mean, sigma^2)`` per knob -> (M,) log-densities."""
    z = (action - mean) / sigma
    return (-0.5 * z * z - np.log(sigma) - 0.5 * np.log(2 * np.pi)).sum(axis=-1)


def greedy_logp(action: Array, greedy: Array, n_actions: int, epsilon: float) -> Array:
    """Log-probability of discrete ``action`` (M,) under epsilon-greedy around ``greedy`` (M,)."""
    p = np.where(action == greedy, 1 - epsilon + epsilon / n_actions, epsilon / n_actions)
    return np.log(p)


def effective_sample_size(tr: Trajectories, clip: float | None = None) -> float:
    """Kish effective sample size of the full-episode weights ``w_{0:T}``, as a fraction of E (1 = on-policy)."""
    wf = _cum_weights(tr, clip, carry=True)[:, -1]
    den = float((wf * wf).sum())
    return float(wf.sum() ** 2 / den / max(tr.n_episodes, 1)) if den > 0 else 0.0


# ---------------------------------------------------------------------------------------------- target policies
def truncnorm_logp(action: Array, mean: Array, sigma: float) -> Array:
    """(M, A) actions under ``N(mean, sigma^2)`` truncated to [-1, 1] per knob -> (M,) exact log-densities."""
    a, m = np.asarray(action, np.float64), np.asarray(mean, np.float64)
    return stats.truncnorm.logpdf(a, (-1.0 - m) / sigma, (1.0 - m) / sigma, loc=m, scale=sigma).sum(axis=-1)


def truncnorm_sample(mean: Array, sigma: float, k: int, rng: np.random.Generator) -> Array:
    """(K, M, A) float32 draws of ``N(mean, sigma^2)`` truncated to [-1, 1], for ``mean`` (M, A)."""
    m = np.asarray(mean, np.float64)
    lo, hi = stats.norm.cdf((-1.0 - m) / sigma), stats.norm.cdf((1.0 - m) / sigma)
    u = rng.random((k, *m.shape))
    z = stats.norm.ppf(lo + u * (hi - lo))
    return np.clip(m + sigma * z, -1.0, 1.0).astype(np.float32)


def nearest_menu_entry(action: Array) -> Array:
    """(M, A) knob actions -> (M,) int64 index of the nearest row of ``MENU_MATRIX``."""
    from envs.feed_env import MENU_MATRIX

    d = ((np.asarray(action, np.float32)[:, None, :] - MENU_MATRIX[None]) ** 2).sum(axis=-1)
    return d.argmin(axis=1).astype(np.int64)


class SampledPolicy:
    """A behaviour policy (``offline_data.policies``: ``sample`` and ``log_prob``) as a target ``Policy``.

    Its actions are fresh draws from its own stream (re-seeded at every ``bind``); ``log_prob`` is the
    behaviour's, in the dataset's action space (knob vectors, or menu indices for discrete data).
    """

    env_overrides: dict[str, Any] = {}  # noqa: RUF012 - read-only class default

    def __init__(self, behaviour: Any, seed: int = 0, name: str = "behaviour") -> None:
        self.behaviour = behaviour
        self.seed = seed
        self.name = name
        self.rng = np.random.default_rng(seed)

    def bind(self, sim: Any) -> None:
        self.rng = np.random.default_rng(self.seed)

    def act(self, obs: Array) -> Array:
        a, _ = self.behaviour.sample(obs, self.rng)
        if getattr(self.behaviour, "discrete", False):
            from envs.feed_env import MENU_MATRIX

            return MENU_MATRIX[np.asarray(a, np.int64)]
        return np.asarray(a, np.float32)

    def log_prob(self, obs: Array, action: Array) -> Array:
        return np.asarray(self.behaviour.log_prob(obs, action), np.float64)


def target_kind(policy: Any, discrete: bool) -> str:
    """How the target's propensity is computed: ``greedy`` (discrete data), ``density`` (the policy's own
    ``log_prob``), ``uniform`` (``RandomKnobs``) or ``smoothed`` (deterministic, truncated-normal smoothing)."""
    from agents.policies import RandomKnobs

    if discrete:
        return "density" if hasattr(policy, "log_prob") else "greedy"
    if hasattr(policy, "log_prob"):
        return "density"
    if isinstance(policy, RandomKnobs):
        return "uniform"
    return "smoothed"


def needs_simulator(policy: Any) -> bool:
    """True for policies that read the simulator's hidden state in ``act`` (the true-scores policy), or set
    ``needs_simulator = True``: their actions at logged states come from :func:`replay_target_actions`."""
    from agents.policies import TrueScores

    return bool(getattr(policy, "needs_simulator", isinstance(policy, TrueScores)))


@dataclass(frozen=True)
class TargetActions:
    """A target policy's knob actions at every logged transition (a draw, for a stochastic policy)."""

    actions: Array  # (M, A) float32 pi(s_t); discrete data: the nearest preset's knob vector
    next_actions: Array  # (M, A) float32 pi(s_{t+1}); zeros after a terminal or timeout (never used)

    def select(self, rows: Array) -> TargetActions:
        """The rows ``rows`` (bool (M,) or int indices), e.g. to follow ``select_episodes``."""
        return TargetActions(self.actions[rows], self.next_actions[rows])


def _snap(action: Array, discrete: bool) -> Array:
    a = np.clip(np.asarray(action, np.float32), -1.0, 1.0)
    if not discrete:
        return a
    from envs.feed_env import MENU_MATRIX

    return MENU_MATRIX[nearest_menu_entry(a)]


def target_actions(ds: LoggedDataset, policy: Policy, cfg: FeedConfig | None = None) -> TargetActions:
    """The target's actions at the logged observations and next observations.

    Observation-only policies are called on the logged arrays in one batch; simulator-bound ones
    (:func:`needs_simulator`) through :func:`replay_target_actions`, which needs ``cfg``.
    """
    if needs_simulator(policy):
        if cfg is None:
            raise ValueError(f"policy {policy.name!r} reads the simulator: pass the dataset's cfg to replay it")
        return replay_target_actions(ds, [policy], cfg)[0]
    tr = ds.transitions
    if len(tr) == 0:
        z = np.zeros((0, N_KNOBS), np.float32)
        return TargetActions(z, z.copy())
    return TargetActions(_snap(policy.act(tr.observations), ds.discrete),
                         _snap(policy.act(tr.next_observations), ds.discrete))


def behaviour_from_meta(meta: dict[str, Any]) -> Any:
    """The dataset's behaviour policy rebuilt from ``meta["behaviour"]``; None if it cannot be re-drawn."""
    from offline_data.policies import EpsilonMenu, GaussianKnobs

    b = meta.get("behaviour", {})
    if b.get("kind") == "gaussian_knobs":
        return GaussianKnobs(np.asarray(b["sigma"], np.float64), np.asarray(b.get("mean", 0.0), np.float64))
    if b.get("kind") == "epsilon_menu":
        return EpsilonMenu(float(b["epsilon"]), int(b["menu_size"]))
    return None


def replay_target_actions(ds: LoggedDataset, policies: Sequence[Policy], cfg: FeedConfig) -> list[TargetActions]:
    """Re-runs the logging run exactly (same seed, the logged actions, the behaviour's own stream for
    slots whose episode had ended) with every policy bound to the replayed simulator, and records what
    each would have done at each logged state. Raises ``ValueError`` if the replayed observations differ
    from the logged ones (another code version, or a behaviour policy that cannot be re-drawn)."""
    from envs.feed_env import MENU_MATRIX
    from envs.simulator import FeedSimulator
    from offline_data.collect import POLICY_STREAM, EpisodeSlots

    meta, tr = ds.meta, ds.transitions
    col = meta["collection"]
    if col.get("worlds", 1) != 1:
        raise ValueError(f"replay_target_actions replays a log of one world; this one was logged on {col['worlds']} "
                         "worlds (collect(worlds=K)): collect the OPE dataset with worlds=1")
    b, seed, autoreset, steps_run = int(col["n_users"]), int(meta["seed"]), bool(col["autoreset"]), col["steps_run"]
    behaviour = behaviour_from_meta(meta)
    sim = FeedSimulator(cfg, b, seed=seed)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(POLICY_STREAM,)))
    stride = int(tr.step.max(initial=0)) + 2
    key = tr.episode_id.astype(np.int64) * stride + tr.step.astype(np.int64)  # sorted: data are episode-major
    obs = sim.reset()
    for p in policies:
        p.bind(sim)
    slots = EpisodeSlots(sim, autoreset)
    acts = [np.zeros((len(tr), N_KNOBS), np.float32) for _ in policies]
    final = [np.zeros((len(tr), N_KNOBS), np.float32) for _ in policies]
    seen = np.zeros(len(tr), bool)
    for t in range(int(steps_run)):
        active = slots.active
        rows_k = slots.episode * stride + slots.step
        idx = np.searchsorted(key, rows_k)
        ok = active & (idx < len(tr))
        ok[ok] = key[idx[ok]] == rows_k[ok]
        if not np.array_equal(ok, active):
            raise ValueError("replay diverged from the logged dataset (episode/step layout differs)")
        r = idx[active]
        if not np.allclose(obs[active], tr.observations[r], atol=1e-5):
            raise ValueError("replay diverged from the logged dataset (observations differ): was it collected "
                             "with this code version and a re-drawable behaviour policy?")
        for i, p in enumerate(policies):
            acts[i][r] = _snap(p.act(obs), ds.discrete)[active]
        seen[r] = True
        if behaviour is not None:
            action, _ = behaviour.sample(obs, rng)
            knob = MENU_MATRIX[action] if ds.discrete else np.asarray(action, np.float32)
        else:
            knob = np.zeros((b, N_KNOBS), np.float32)
        knob = knob.copy()
        knob[active] = tr.knob_actions[r]
        res = sim.step(knob)
        last = t == int(steps_run) - 1
        done = res.terminated | res.truncated
        cut = active & ~done & last
        if cut.any():
            for i, p in enumerate(policies):
                final[i][idx[cut]] = _snap(p.act(res.obs), ds.discrete)[cut]
        obs = slots.advance(sim, res.obs, done, last)
        if not slots.active.any():
            break
    if not seen.all():
        raise ValueError("replay did not reach every logged transition")
    same_next = np.r_[tr.episode_id[1:] == tr.episode_id[:-1], False]
    out = []
    for a, f in zip(acts, final):
        nxt = f.copy()
        nxt[same_next] = a[1:][same_next[:-1]]
        out.append(TargetActions(a, nxt))
    return out


# ---------------------------------------------------------------------------------------------- trajectories
def build_trajectories(ds: LoggedDataset, policy: Policy, target: TargetActions | None = None, *,
                       cfg: FeedConfig | None = None, horizon: int = 50, sigma: float = 0.3,
                       epsilon: float = 0.1) -> Trajectories:
    """Padded (E, H) trajectories of ``ds`` with the target's log-propensity of every logged action.

    Args:
        ds: a logged dataset with behaviour log-probabilities (NaN = unknown is refused).
        policy: the target policy; see :func:`target_kind` for how its propensity is computed.
        target: its actions at the logged states (computed with :func:`target_actions` if None).
        cfg: the dataset's config (only to replay simulator-bound policies).
        horizon: H, steps kept per episode (steps ``>= H`` are dropped).
        sigma: smoothing standard deviation of a deterministic continuous target (per knob).
        epsilon: exploration of the epsilon-greedy target on discrete data.
    """
    tr = ds.transitions
    blp = np.asarray(tr.behaviour_log_prob, np.float64)
    if np.isnan(blp).any():
        raise ValueError("the dataset has unknown behaviour propensities (NaN): importance weighting needs them")
    if sigma <= 0 or not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"need sigma > 0 and epsilon in [0, 1], got sigma={sigma!r}, epsilon={epsilon!r}")
    target = target if target is not None else target_actions(ds, policy, cfg)
    tlp = target_log_prob(ds, policy, target, sigma=sigma, epsilon=epsilon)
    rows = np.arange(len(tr), dtype=np.float64)
    pad = pad_episodes(tr.episode_id, tr.step, {"rewards": tr.rewards.astype(np.float64), "behaviour_logp": blp,
                                                "target_logp": tlp, "rows": rows}, horizon)
    row_idx = np.where(pad["mask"], pad["rows"], -1).astype(np.int64)
    return Trajectories(pad["rewards"], pad["mask"], pad["behaviour_logp"], pad["target_logp"], row_idx)


def target_log_prob(ds: LoggedDataset, policy: Any, target: TargetActions, *, sigma: float = 0.3,
                    epsilon: float = 0.1) -> Array:
    """(M,) float64 log pi(a_t | s_t) of every logged action (see the module docstring)."""
    tr = ds.transitions
    kind = target_kind(policy, ds.discrete)
    if kind == "density":
        return np.asarray(policy.log_prob(tr.observations, tr.actions), np.float64).reshape(len(tr))
    if kind == "greedy":
        from envs.feed_env import MENU_MATRIX

        return greedy_logp(tr.actions.astype(np.int64), nearest_menu_entry(target.actions), len(MENU_MATRIX), epsilon)
    if kind == "uniform":
        inside = np.all(np.abs(tr.knob_actions) <= 1.0, axis=-1)
        return np.where(inside, -N_KNOBS * np.log(2.0), -np.inf)
    return truncnorm_logp(tr.actions, target.actions, sigma)


# ---------------------------------------------------------------------------------------------- fitted-Q evaluation
@dataclass(frozen=True)
class FQEParams:
    """Fitted-Q evaluation: a small MLP ``Q(s, a, h)`` fitted by ``n_iters`` rounds of regression on
    ``r + gamma * Q_prev(s', pi(s'), h - 1)``, ``steps_per_iter`` Adam steps each."""

    hidden: int = 64
    n_iters: int | None = None  # None = 2 * horizon (H rounds is the backward-induction depth; the rest
    # absorbs the lag of warm-started, inexact fits)
    steps_per_iter: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0
    rate: bool = False
    """True: the network predicts the reward rate ``Q / sum_{k<h} gamma^k`` (exact for constant rewards,
    but extrapolation errors grow with h); False: ``Q / sum_{k<H} gamma^k`` (steadier off the data)."""


@dataclass
class FittedQ:
    """A fitted ``Q(s, a, h)``; call it on (M, D) observations, (M, A) knob actions, (M,) steps left.

    The network predicts ``f`` with ``Q = scale * f * c(h)``: ``c(h) = sum_{k<h} gamma^k`` with ``rate``
    (a constant reward is a constant ``f``), else ``c(h) = sum_{k<H} gamma^k``; ``Q(., ., 0) = 0`` always.
    """

    net: Any
    obs_mean: Array  # (D,) float32
    obs_std: Array  # (D,) float32
    horizon: int
    gamma: float
    scale: float  # reward scale (mean |r| of the data)
    rate: bool = False
    history: list[float] = field(default_factory=list)  # mean squared Bellman residual of f per round

    def features(self, obs: Array, actions: Array, steps_left: Array) -> Array:
        x = (np.asarray(obs, np.float32) - self.obs_mean) / self.obs_std
        h = (np.asarray(steps_left, np.float32) / self.horizon)[:, None]
        return np.concatenate([x, np.asarray(actions, np.float32), h], axis=1).astype(np.float32)

    def discount_sum(self, steps_left: Array) -> Array:
        """(M,) ``c(h)``: ``sum_{k<h} gamma^k`` (``rate``) or ``sum_{k<H} gamma^k``; 0 where ``h = 0``."""
        h = np.asarray(steps_left, np.float64)
        hh = h if self.rate else np.where(h > 0, float(self.horizon), 0.0)
        return hh if self.gamma == 1.0 else (1.0 - self.gamma**hh) / (1.0 - self.gamma)

    def __call__(self, obs: Array, actions: Array, steps_left: Array) -> Array:
        import torch

        if len(obs) == 0:
            return np.zeros(0)
        with torch.no_grad():
            f = self.net(torch.from_numpy(self.features(obs, actions, steps_left))).squeeze(-1).numpy()
        return f.astype(np.float64) * self.scale * self.discount_sum(steps_left)


def fit_fqe(obs: Array, actions: Array, rewards: Array, next_obs: Array, next_actions: Array, steps_left: Array,
            done: Array, *, gamma: float, horizon: int, params: FQEParams | None = None) -> FittedQ:
    """Fits ``Q(s, a, h) = E[sum_{k<h} gamma^k r_k]`` under the target policy on M logged transitions.

    Args:
        obs, next_obs: (M, D) float32. actions: (M, A) logged knob actions.
        rewards: (M,). steps_left: (M,) int, ``H - step`` (>= 1).
        next_actions: (M, A) the target's action at ``next_obs``.
        done: (M,) bool, the episode ended here (churn or horizon): no bootstrap.
        gamma, horizon: discount and H.
    """
    import torch

    p = params or FQEParams()
    m = len(rewards)
    if m == 0:
        raise ValueError("FQE needs at least one transition")
    rng = np.random.default_rng(p.seed)
    mean = obs.mean(axis=0).astype(np.float32)
    std = np.maximum(obs.std(axis=0), 1e-3).astype(np.float32)
    scale = max(float(np.abs(rewards).mean()), 1e-6)
    d_in = obs.shape[1] + actions.shape[1] + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        net = torch.nn.Sequential(torch.nn.Linear(d_in, p.hidden), torch.nn.SiLU(), torch.nn.Linear(p.hidden, p.hidden),
                                  torch.nn.SiLU(), torch.nn.Linear(p.hidden, 1))
    fq = FittedQ(net, mean, std, horizon, float(gamma), scale, p.rate)
    h_now = np.asarray(steps_left, np.int64)
    h_next = h_now - 1
    boot = ~np.asarray(done, bool) & (h_next > 0)
    x = torch.from_numpy(fq.features(obs, actions, h_now))
    x_next = torch.from_numpy(fq.features(next_obs, next_actions, h_next))
    c_now = torch.from_numpy((scale * fq.discount_sum(h_now)).astype(np.float32))
    c_next = torch.from_numpy((scale * fq.discount_sum(h_next) * boot).astype(np.float32))
    r = torch.from_numpy(np.asarray(rewards, np.float32))
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    bs = min(p.batch_size, m)
    n_iters = p.n_iters if p.n_iters is not None else 2 * horizon
    for _ in range(n_iters):
        with torch.no_grad():  # target reward rate: (r + gamma * Q_prev(s', pi(s'), h - 1)) / (scale * disc(h))
            y = (r + gamma * c_next * net(x_next).squeeze(-1)) / c_now
        for _ in range(p.steps_per_iter):
            idx = torch.from_numpy(rng.integers(0, m, bs))
            loss = ((net(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            fq.history.append(float(((net(x).squeeze(-1) - y) ** 2).mean()))
    return fq


def _ended(ds: LoggedDataset) -> Array:
    tr = ds.transitions
    return np.asarray(tr.terminals, bool) | np.asarray(tr.timeouts, bool)


def fit_fqe_dataset(ds: LoggedDataset, target: TargetActions, *, horizon: int, gamma: float,
                    params: FQEParams | None = None) -> FittedQ:
    """:func:`fit_fqe` on the logged steps ``< horizon`` of ``ds`` with the target's next actions."""
    tr = ds.transitions
    keep = tr.step < horizon
    return fit_fqe(tr.observations[keep], tr.knob_actions[keep], tr.rewards[keep], tr.next_observations[keep],
                   target.next_actions[keep], horizon - tr.step[keep].astype(np.int64), _ended(ds)[keep],
                   gamma=gamma, horizon=horizon, params=params)


def fqe_value(q: FittedQ, ds: LoggedDataset, target: TargetActions, horizon: int) -> float:
    """FQE estimate: mean over logged episodes starting at step 0 of ``Q(s_0, pi(s_0), H)``."""
    tr = ds.transitions
    first = tr.step == 0
    if not first.any():
        raise ValueError("no logged episode starts at step 0")
    return float(q(tr.observations[first], target.actions[first], np.full(int(first.sum()), horizon)).mean())


def dr_inputs(q: FittedQ, ds: LoggedDataset, policy: Any, target: TargetActions, tr_pad: Trajectories, *,
              sigma: float = 0.3, epsilon: float = 0.1, n_samples: int = 16, seed: int = 0) -> tuple[Array, Array]:
    """(E, H) ``q(s_t, a_t)`` of the logged actions and ``v(s_t) = E_{a ~ pi} q(s_t, a)`` for
    :func:`doubly_robust`, with ``pi`` the policy whose propensities ``tr_pad`` carries (smoothed,
    epsilon-greedy or stochastic: ``n_samples`` draws; the discrete expectation is exact)."""
    from envs.feed_env import MENU_MATRIX

    data = ds.transitions
    rows = tr_pad.rows if tr_pad.rows is not None else None
    if rows is None:
        raise ValueError("the trajectories carry no row index: build them with build_trajectories")
    sel = rows[tr_pad.mask]
    h = tr_pad.rewards.shape[1]
    obs = data.observations[sel]
    left = h - data.step[sel].astype(np.int64)
    q_log = q(obs, data.knob_actions[sel], left)
    kind = target_kind(policy, ds.discrete)
    rng = np.random.default_rng(seed)
    if kind == "greedy":
        greedy = nearest_menu_entry(target.actions[sel])
        n_p = len(MENU_MATRIX)
        v = np.zeros(sel.size)
        for j in range(n_p):
            pj = np.where(greedy == j, 1 - epsilon + epsilon / n_p, epsilon / n_p)
            v += pj * q(obs, np.broadcast_to(MENU_MATRIX[j], (sel.size, N_KNOBS)), left)
    elif kind == "smoothed":
        draws = truncnorm_sample(target.actions[sel], sigma, n_samples, rng)
        v = np.mean([q(obs, a, left) for a in draws], axis=0)
    elif kind == "uniform":
        v = np.mean([q(obs, rng.uniform(-1, 1, (sel.size, N_KNOBS)).astype(np.float32), left)
                     for _ in range(n_samples)], axis=0)
    else:
        v = np.mean([q(obs, _snap(policy.act(obs), ds.discrete), left) for _ in range(n_samples)], axis=0)
    q_pad = np.zeros(tr_pad.rewards.shape)
    v_pad = np.zeros(tr_pad.rewards.shape)
    q_pad[tr_pad.mask] = q_log
    v_pad[tr_pad.mask] = v
    return q_pad, v_pad


# ---------------------------------------------------------------------------------------------- all estimators
def estimate(ds: LoggedDataset, policy: Policy, *, cfg: FeedConfig | None = None, horizon: int = 50,
             gamma: float = 0.99, sigma: float = 0.3, epsilon: float = 0.1, fqe: FQEParams | None = None,
             target: TargetActions | None = None, episodes: Array | None = None, n_samples: int = 16,
             seed: int = 0) -> dict[str, float]:
    """IS, WIS, DR and FQE estimates of the target's H-request discounted value from ``ds``.

    Args:
        episodes: episode ids to use (None = all); the target's actions are computed on the whole
            dataset first (a replay needs every row), then restricted.
        Other arguments: see :func:`build_trajectories` and :class:`FQEParams`.

    Returns:
        ``{"IS", "WIS", "DR", "FQE", "ESS", "n_episodes"}``; ESS is the full-episode effective sample
        size as a fraction of the episodes.
    """
    target = target if target is not None else target_actions(ds, policy, cfg)
    if episodes is not None:
        from offline_data.dataset import select_episodes

        keep = np.isin(ds.transitions.episode_id, episodes)
        ds, target = select_episodes(ds, episodes), target.select(keep)
    tr = build_trajectories(ds, policy, target, horizon=horizon, sigma=sigma, epsilon=epsilon)
    q = fit_fqe_dataset(ds, target, horizon=horizon, gamma=gamma, params=fqe)
    q_pad, v_pad = dr_inputs(q, ds, policy, target, tr, sigma=sigma, epsilon=epsilon, n_samples=n_samples, seed=seed)
    return {"IS": per_decision_is(tr, gamma), "WIS": weighted_is(tr, gamma),
            "DR": doubly_robust(tr, q_pad, v_pad, gamma), "FQE": fqe_value(q, ds, target, horizon),
            "ESS": effective_sample_size(tr), "n_episodes": float(tr.n_episodes)}


def logged_returns(ds: LoggedDataset, horizon: int, gamma: float) -> Array:
    """(E,) discounted return over the first H logged steps of each episode (the behaviour's Monte Carlo)."""
    tr = ds.transitions
    pad = pad_episodes(tr.episode_id, tr.step, {"r": tr.rewards.astype(np.float64)}, horizon)
    return (pad["r"] * _discounts(horizon, gamma)).sum(axis=1)


# ---------------------------------------------------------------------------------------------- on-policy truth
def on_policy_returns(policy: Policy, cfg: FeedConfig, n_users: int, seed: int, *, horizon: int = 50,
                      gamma: float = 0.99, discrete: bool = False, env_overrides: bool = True) -> Array:
    """(B,) discounted return over the first H requests of each user's episode, running ``policy`` in
    ``FeedSimulator(cfg, n_users, seed)`` (the dataset's seed -> the same users as the logged episodes).

    Args:
        discrete: map the policy's actions to the nearest preset (what OPE on preset data evaluates).
        env_overrides: apply the policy's ``env_overrides`` (its real deployment); False keeps the
            logged pipeline (the only thing OPE from the logs can see).
    """
    from envs.simulator import FeedSimulator

    pcfg = cfg.replace(**policy.env_overrides) if env_overrides and policy.env_overrides else cfg
    sim = FeedSimulator(pcfg, n_users, seed=seed)
    obs = sim.reset()
    policy.bind(sim)
    ret = np.zeros(n_users)
    active = np.ones(n_users, bool)
    for t in range(horizon):
        res = sim.step(_snap(policy.act(obs), discrete))
        ret += np.where(active, gamma**t * res.reward.astype(np.float64), 0.0)
        active &= ~(res.terminated | res.truncated)
        if not active.any():
            break
        obs = res.obs
    return ret


@dataclass(frozen=True)
class OPESettings:
    """What every target of one OPE comparison shares (sent to the executor's workers once)."""

    ds: LoggedDataset
    cfg: FeedConfig
    horizon: int
    gamma: float
    sigma: float
    epsilon: float
    fqe: FQEParams
    episodes: Array | None
    n_samples: int
    seed: int
    models: list = field(default_factory=list)
    """The trained models the targets' worlds serve (:func:`agents.rollouts.models_for`), for a worker process."""


@dataclass(frozen=True)
class OPETarget:
    """One target policy of an OPE comparison (``target``: its replayed actions, for simulator-bound ones)."""

    policy: Policy
    target: TargetActions | None = None

    @property
    def label(self) -> str:
        return self.policy.name


def estimate_with_truth(s: OPESettings, job: OPETarget) -> dict[str, Any]:
    """:func:`estimate` of ``job``'s policy from ``s.ds`` beside its on-policy truth (:func:`on_policy_returns` on
    the dataset's users): ``{"estimates", "returns", "returns_logged_pipeline"}`` (the last None unless the policy
    has ``env_overrides``: its returns under the logged pipeline). One job of ``scripts/evaluate.py``'s executor."""
    from agents.rollouts import provide

    provide(s.models)
    col = s.ds.meta["collection"]
    n_users, seed = int(col["n_users"]), int(s.ds.meta["seed"])
    pol = job.policy
    est = estimate(s.ds, pol, cfg=s.cfg, horizon=s.horizon, gamma=s.gamma, sigma=s.sigma, epsilon=s.epsilon,
                   fqe=s.fqe, target=job.target, episodes=s.episodes, n_samples=s.n_samples, seed=s.seed)
    ret = on_policy_returns(pol, s.cfg, n_users, seed, horizon=s.horizon, gamma=s.gamma, discrete=s.ds.discrete)
    logged = None
    if pol.env_overrides:
        logged = on_policy_returns(pol, s.cfg, n_users, seed, horizon=s.horizon, gamma=s.gamma,
                                   discrete=s.ds.discrete, env_overrides=False)
    return {"estimates": est, "returns": ret, "returns_logged_pipeline": logged}
