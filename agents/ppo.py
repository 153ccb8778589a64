"""PPO (stable-baselines3) on the batched feed: training with checkpoints that resume, and the
policy adapter evaluation uses."""

from __future__ import annotations

import io
import json
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, SupportsFloat, cast

import numpy as np
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.vec_env import VecEnvWrapper, VecFrameStack
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs

from agents.checkpoints import (
    MODEL_SHA256,
    CheckpointMismatchError,
    check_discrete,
    check_fits,
    check_meta,
    check_observation_dim,
    load_model_file,
    read_checkpoint,
    set_aside,
    sha256_bytes,
    training_config,
)
from agents.policies import FrameStack, MenuKnobs, SessionHeld, module_digest
from agents.sinks import MetricsSink, NoopSink
from envs.config import ENV_VERSION, FeedConfig
from envs.sb3 import SB3FeedVecEnv
from envs.sessions import check_decision
from rankers.fileio import atomic_write
from rankers.types import Array

CHECKPOINT = "checkpoint.zip"
META = "checkpoint.json"


@dataclass(frozen=True)
class PPOParams:
    """SB3's own names, passed through."""

    n_steps: int = 64
    batch_size: int = 1024
    n_epochs: int = 4
    learning_rate: float = 3e-4
    gamma: float = 0.995
    gae_lambda: float = 0.95
    ent_coef: float = 0.0
    clip_range: float = 0.2
    log_std_init: float = -1.0
    """Initial log-std of the Gaussian policy (SB3 ``policy_kwargs``). At SB3's default 0 the clipped
    actions bias the mean toward the box edges; -1 keeps exploration inside the knob box."""
    gamma_per_day: float = 0.0
    """0: one discount ``gamma`` per request (SB3's MDP). In (0, 1]: a discount per simulated day, a semi-MDP:
    step t is discounted by ``gamma_per_day ** days_t``, the days it took for the user (the request, plus the
    gap when a session ended: ``info["retention/elapsed_days"]``), so coming back a day sooner is worth the
    same whatever the number of requests in between (:class:`ElapsedTimeRolloutBuffer`). ``gamma`` is then
    only SB3's bootstrap factor at a horizon truncation and is set to 1."""
    decision: str = "request"
    """The env's decision granularity (:mod:`envs.sessions`): ``request`` (a step is a feed request) or
    ``session`` (a step is a session under knobs chosen at its start and held; ``total_timesteps`` then counts
    user-sessions, ``info["session/requests"]`` the requests each one simulated). Not an SB3 parameter: it
    builds the training env, and the trained policy is served the same way (:class:`agents.policies.SessionHeld`)."""
    frame_stack: int = 1
    """Memory: the policy sees its user's last ``frame_stack`` observations (SB3's ``VecFrameStack``; zeros before
    the user's first one), in training and in evaluation (:class:`agents.policies.FrameStack`). 1 = none."""

    def __post_init__(self) -> None:
        check_decision(self.decision)
        if not isinstance(self.frame_stack, int) or self.frame_stack < 1:
            raise ValueError(f"PPOParams.frame_stack={self.frame_stack!r} is invalid: an int >= 1 (1 = no memory)")
        if self.frame_stack > 1 and self.decision == "session":
            raise ValueError("PPOParams: frame_stack > 1 with decision='session' is not supported (the held-knob "
                             "policy asks only the users whose session starts; their stacks would skip the others)")


class AnchoredActions(VecEnvWrapper):
    """Residual actions: the policy's action is added to a fixed knob vector (the anchor, e.g. the CEM-tuned
    one) and clipped to the knob box, so the zero action of a fresh policy serves the anchor.

    Residual policy learning: per-request Gaussian exploration around zero does not find a constant knob
    direction whose effect on 30-day retention builds up over hundreds of requests (see docs/point7.md);
    starting from the tuned static vector lets PPO spend its budget on state-dependent corrections."""

    def __init__(self, venv: Any, anchor: Array) -> None:
        super().__init__(venv)
        a = np.asarray(anchor, np.float32).reshape(-1)
        if a.shape != venv.action_space.shape or not np.all(np.isfinite(a)) or np.any(np.abs(a) > 1):
            raise ValueError(f"anchor must be {venv.action_space.shape} finite knob values in [-1, 1], got {anchor!r}")
        self.anchor = a

    def reset(self) -> VecEnvObs:
        return self.venv.reset()

    def step_async(self, actions: Array) -> None:
        self.venv.step_async(anchored(actions, self.anchor))

    def step_wait(self) -> Any:
        return self.venv.step_wait()


def anchored(actions: Array, anchor: Array | None) -> Array:
    """``clip(anchor + actions, -1, 1)`` (``actions`` unchanged when there is no anchor)."""
    if anchor is None:
        return actions
    return np.clip(np.asarray(actions, np.float32) + anchor, -1.0, 1.0).astype(np.float32)


class ElapsedTimeRolloutBuffer(RolloutBuffer):
    """SB3's rollout buffer with GAE over a semi-MDP: the discount of step t is ``gamma_day ** days[t]``
    (``days`` filled from each step's ``info["retention/elapsed_days"]`` by :class:`ElapsedTimeCallback`)."""

    def __init__(self, *args: Any, gamma_day: float = 0.99, **kwargs: Any) -> None:
        if not 0.0 < gamma_day <= 1.0:
            raise ValueError(f"gamma_per_day={gamma_day} must be in (0, 1]")
        self.gamma_day = gamma_day
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        self.days = np.zeros((self.buffer_size, self.n_envs), np.float32)
        super().reset()

    def compute_returns_and_advantage(self, last_values: Any, dones: Array) -> None:
        last = last_values.clone().cpu().numpy().flatten()
        gae = np.zeros(self.n_envs, np.float32)
        for step in reversed(range(self.buffer_size)):
            if step == self.buffer_size - 1:
                alive, nxt = 1.0 - dones.astype(np.float32), last
            else:
                alive, nxt = 1.0 - self.episode_starts[step + 1], self.values[step + 1]
            g = self.gamma_day ** self.days[step]
            delta = self.rewards[step] + g * nxt * alive - self.values[step]
            gae = delta + g * self.gae_lambda * alive * gae
            self.advantages[step] = gae
        self.returns = self.advantages + self.values


class ElapsedTimeCallback(BaseCallback):
    """Records each step's simulated days into an :class:`ElapsedTimeRolloutBuffer` (SB3 calls ``on_step`` after
    ``env.step`` and before the buffer's ``add``, so ``pos`` is the step's row)."""

    def _on_step(self) -> bool:
        buf = getattr(self.model, "rollout_buffer", None)
        if isinstance(buf, ElapsedTimeRolloutBuffer):
            buf.days[buf.pos] = [float(i.get("retention/elapsed_days", 0.0)) for i in self.locals["infos"]]
        return True


def make_ppo(env: Any, params: PPOParams, seed: int) -> PPO:
    """SB3 PPO with ``params`` passed through (``log_std_init`` via ``policy_kwargs``; ``gamma_per_day`` > 0
    selects :class:`ElapsedTimeRolloutBuffer`, which needs :class:`ElapsedTimeCallback` in ``learn``)."""
    kw = asdict(params)
    log_std = kw.pop("log_std_init")
    per_day = kw.pop("gamma_per_day")
    kw.pop("decision")
    kw.pop("frame_stack")
    if per_day:
        kw.update(gamma=1.0, rollout_buffer_class=ElapsedTimeRolloutBuffer,
                  rollout_buffer_kwargs={"gamma_day": per_day})
    pk = {} if isinstance(env.action_space, spaces.Discrete) else {"log_std_init": log_std}
    model = PPO("MlpPolicy", env, seed=seed, device="cpu", verbose=0, policy_kwargs=pk, **kw)
    model.set_logger(_silent_logger())
    return model


def _silent_logger() -> Logger:
    """An SB3 logger with no outputs. Without one, every ``learn`` configures SB3's default, which creates an
    empty ``SB3-<date>`` directory in the system's temp dir even at ``verbose=0``; the values it records
    (``name_to_value``) still reach the sink through :class:`SB3SinkCallback`."""
    return Logger(folder=None, output_formats=[])


class SB3SinkCallback(BaseCallback):
    """Forwards SB3's logger values and episode-level env metrics to a :class:`MetricsSink`, and
    checkpoints every ``save_every`` steps."""

    def __init__(self, sink: MetricsSink, out: Path, meta: dict[str, Any], save_every: int) -> None:
        super().__init__()
        self.sink = sink
        self.out = out
        self.meta = meta
        self.save_every = save_every
        self._last_save = 0
        self._acc: dict[str, float] = {}
        self._n = 0

    def _on_step(self) -> bool:
        for info in self.locals.get("infos", []):
            for k in ("engagement/watch_s", "engagement/regrets", "retention/returned", "retention/churned",
                      "creators/new_creator_impressions", "engagement/videos"):
                self._acc[k] = self._acc.get(k, 0.0) + float(info.get(k, 0.0))
            self._n += 1
        if self.num_timesteps - self._last_save >= self.save_every:
            save_ppo(self.model, self.out, self.meta)
            self._last_save = self.num_timesteps
        return True

    def _on_rollout_end(self) -> None:
        vals = {f"train/{k.split('/')[-1]}_per_step": v / max(self._n, 1) for k, v in self._acc.items()}
        # cast: np.isscalar's type guard turns SB3's float values into numpy's scalar union (str and bytes included)
        logger_vals = {k.replace("train/", "losses/") if "loss" in k else k: float(cast(SupportsFloat, v))
                       for k, v in self.model.logger.name_to_value.items() if np.isscalar(v)}
        self.sink.log({**vals, **logger_vals}, step=self.num_timesteps)
        self._acc.clear()
        self._n = 0


def save_ppo(model: BaseAlgorithm, out: Path, meta: dict[str, Any]) -> None:
    """Atomically writes the model, then its metadata (env version, config, timesteps and the model file's
    sha256): a run killed between the two writes leaves a model that does not match its metadata, which
    :func:`load_ppo` refuses as incomplete instead of resuming it with another step count."""
    buf = io.BytesIO()
    model.save(buf)  # SB3 writes its zip to the file object
    data = buf.getvalue()
    atomic_write(out / CHECKPOINT, data)
    atomic_write(out / META, json.dumps({**meta, "num_timesteps": int(model.num_timesteps),
                                         MODEL_SHA256: sha256_bytes(data)}, indent=1).encode())


def load_ppo(out: Path, cfg: FeedConfig, env: Any = None, params: dict[str, Any] | None = None,
                    discrete: bool | None = None) -> PPO:
    """Loads a checkpoint, refusing one from another env version or config (and, if given, trained with other
    hyperparameters ``params`` or on the other action space ``discrete``) with :class:`CheckpointMismatchError`,
    and one whose files are damaged, incomplete or do not match each other with its subclass
    :class:`~agents.checkpoints.CorruptCheckpointError`. ``FileNotFoundError`` if ``out`` holds neither file."""
    model_path, meta_path = out / CHECKPOINT, out / META
    meta = read_checkpoint(model_path, meta_path, "PPO")
    check_meta(meta, cfg, out, params=params)
    if discrete is not None:
        check_discrete(meta, discrete, out)
    return load_model_file(lambda: PPO.load(model_path, env=env, device="cpu"), model_path, "stable-baselines3")


def train_ppo(cfg: FeedConfig, total_timesteps: int, out: Path, seed: int = 0, num_envs: int = 64,
              params: PPOParams | None = None, sink: MetricsSink | None = None, resume: bool = True,
              discrete: bool = False, save_every: int = 50_000, progress: bool = False,
              restart_mismatched: bool = False, anchor: Array | None = None, worlds: int = 1,
              world_steps: int = 0) -> PPO:
    """Trains (or resumes) PPO on ``num_envs`` simulated users at once and checkpoints to ``out``.

    With ``anchor`` (a knob vector, continuous knobs only) the policy learns a residual on it
    (:class:`AnchoredActions`); the anchor is recorded with the hyperparameters, so resuming with
    another anchor is a mismatch.

    ``worlds`` / ``world_steps``: the ``num_envs`` users are spread over that many worlds, each rebuilt
    from a fresh seed every ``world_steps`` steps (:class:`envs.world_mix.WorldMix`), so the policy does not
    learn one world's corpus; recorded with the hyperparameters.

    A checkpoint in ``out`` from another env version, config or action space, or a damaged or incomplete one
    (:class:`~agents.checkpoints.CorruptCheckpointError`), raises :class:`CheckpointMismatchError`, or with
    ``restart_mismatched`` is moved aside (``<out>.stale-<n>``, nothing is deleted) and training starts afresh."""
    params = params or PPOParams()
    rollout = params.n_steps * num_envs
    if params.batch_size > rollout or rollout % params.batch_size:
        params = replace(params, batch_size=max(d for d in range(1, min(params.batch_size, rollout) + 1)
                                                if rollout % d == 0))
    sink = sink or NoopSink()
    if anchor is not None and discrete:
        raise ValueError("an anchor is a knob vector: it needs the continuous env (discrete=False)")
    env: Any = SB3FeedVecEnv(num_envs, config=cfg, seed=seed, discrete=discrete, worlds=worlds,
                             world_steps=world_steps, decision=params.decision)
    if anchor is not None:
        env = AnchoredActions(env, anchor)
        anchor = env.anchor
    if params.frame_stack > 1:
        env = VecFrameStack(env, params.frame_stack)
    anchor_list = None if anchor is None else [float(x) for x in anchor]  # float32 values: exact in JSON
    meta: dict[str, Any] = {
        "env_version": ENV_VERSION, "preset": cfg.preset, "config": cfg.to_json(), "seed": seed,
        "discrete": discrete, "params": {**asdict(params), "anchor": anchor_list, "worlds": worlds,
                                         "world_steps": world_steps}}
    model = None
    if resume and ((out / CHECKPOINT).exists() or (out / META).exists()):
        try:
            model = load_ppo(out, cfg, env=env, params=meta["params"], discrete=discrete)
            model.set_random_seed(seed + int(model.num_timesteps))
        except CheckpointMismatchError as err:
            if not restart_mismatched:
                raise
            set_aside(out, err)
    if model is None:
        model = make_ppo(env, params, seed)
    model.set_logger(_silent_logger())  # a loaded model configures SB3's default on learn(), which makes a temp dir
    remaining = total_timesteps - int(model.num_timesteps)
    cb = CallbackList([ElapsedTimeCallback(), SB3SinkCallback(sink, out, meta, save_every)])
    if remaining > 0:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="rich is experimental")
            model.learn(remaining, callback=cb, reset_num_timesteps=False, progress_bar=progress)
    save_ppo(model, out, meta)
    return model


class SB3Policy:
    """Evaluation adapter: deterministic actions of a trained SB3 model (added to its ``anchor`` if it
    learned a residual, :class:`AnchoredActions`).

    ``bind`` and ``act`` refuse a simulator or observations of another size than the model was trained on
    (``trained_on``: its preset, for the message) with a ``ValueError`` naming both, instead of SB3's shape
    error inside a worker."""

    env_overrides: dict[str, Any] = {}  # noqa: RUF012

    def __init__(self, model: Any, name: str = "ppo", anchor: Array | None = None,
                 trained_on: str | None = None, frames: int = 1) -> None:
        self.model = model
        self.name = name
        self.anchor = None if anchor is None else np.asarray(anchor, np.float32).reshape(-1)
        self.trained_on = trained_on
        self.stack = FrameStack(frames) if frames > 1 else None
        obs_space, act_space = getattr(model, "observation_space", None), getattr(model, "action_space", None)
        shape = getattr(obs_space, "shape", None)
        self.obs_dim = int(shape[-1]) // frames if shape else None  # one observation's (the model sees frames)
        self.discrete = isinstance(act_space, spaces.Discrete)
        act_shape = getattr(act_space, "shape", None)
        self.action_dim = (int(act_space.n) if isinstance(act_space, spaces.Discrete) else
                           int(act_shape[-1]) if act_shape else None)
        self._preset: str | None = None

    def bind(self, sim: Any) -> None:
        self._preset = check_fits(self, sim)
        if self.stack is not None:
            self.stack.bind(sim)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (sent to an executor's worker) as SB3 saves the model: its parameters and hyperparameters,
        without the training env and rollout buffer that the model object holds (tens of MB on ``small``); loaded
        back on the other side, it acts bit for bit as here."""
        buf = io.BytesIO()
        self.model.save(buf)
        return {**self.__dict__, "model": buf.getvalue(), "model_class": type(self.model)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        model_class = state.pop("model_class", None)
        if isinstance(state["model"], bytes) and model_class is not None:
            state["model"] = model_class.load(io.BytesIO(state["model"]), device="cpu")
        self.__dict__.update(state)

    def fingerprint(self) -> dict[str, Any]:
        """The network's parameters, the action space (predict clips to it) and the anchor."""
        return {"class": "SB3Policy", "name": self.name, "params": module_digest(self.model.policy),
                "frames": 1 if self.stack is None else self.stack.frames,
                "action_space": repr(self.model.action_space),
                "anchor": None if self.anchor is None else self.anchor.tolist()}

    def act(self, obs: Array) -> Array:
        check_observation_dim(self.name, self.trained_on, self.obs_dim, int(np.shape(obs)[-1]), self._preset)
        action, _ = self.model.predict(obs if self.stack is None else self.stack.push(obs), deterministic=True)
        return anchored(np.asarray(action, np.float32), self.anchor)


def load_ppo_policy(path: Path, name: str | None = None) -> Any:
    """The trained PPO agent of the checkpoint directory ``path`` as a policy (a discrete one answers knob
    vectors through its menu entry), checked as :func:`agents.loading.load_agent` says."""
    model_path, meta_path = path / CHECKPOINT, path / META
    meta = read_checkpoint(model_path, meta_path, "PPO")
    training_config(meta, path)
    discrete = bool(meta.get("discrete"))
    label = name or ("ppo_discrete" if discrete else "ppo")
    model = load_model_file(lambda: PPO.load(model_path, device="cpu"), model_path, "stable-baselines3")
    params = meta.get("params", {})
    pol: Any = SB3Policy(model, name=label, anchor=params.get("anchor"), trained_on=meta.get("preset"),
                         frames=int(params.get("frame_stack", 1)))
    pol = MenuKnobs(pol, label) if discrete else pol
    return SessionHeld(pol) if params.get("decision", "request") == "session" else pol
