"""The learned models a world serves: which config fields they depend on, the pipelines to choose from, and
the models given to this process.

A :class:`~envs.config.FeedConfig` whose pipeline asks for trained models (``PipelineConfig(retrieval=
"two_tower", preranker="learned", scorer="learned")``, any of them; the default of ``small`` and
``default``) is served the models it was given: :class:`~envs.simulator.FeedSimulator` takes them as
``models=``, or from :func:`provide_models`, which gives every simulator of a world in this process the same
models. The env never collects logs or trains models itself: :mod:`offline_data.provision` does (collect a
log, train, cache under the user's cache directory) and provides them, when the user asks for it with
:func:`offline_data.provision.ensure_rankers` or through the registered ``gym.make`` entry points, which
document it. A simulator whose config needs models it was not given raises :class:`MissingModelsError`
saying how to get them.

The models depend on the world and stages 1-3 of the system that logged their training data, not on how they
are served: :data:`SERVING_FIELDS` and the reward do not enter :func:`models_key`, so every ablation and
baseline of a world is served by the same models, as production models serve every experiment.
"""

from __future__ import annotations

import json
from typing import Any

from envs.config import FeedConfig
from rankers.config import LEARNED_PIPELINE, NOISY_ORACLE_PIPELINE

SERVING_FIELDS: tuple[str, ...] = (
    "scorer", "retrieval", "preranker", "retrieval_refresh_days", "index", "ivf_nlist", "ivf_nprobe",  # models
    "candidate_mode", "recsim_candidates", "score_mode", "rebalancing", "adaptation", "diversity_rules",
    "max_per_creator", "min_topics", "min_new_creator", "max_consecutive_format", "diversity_penalty", "explore_share",
    "uncertainty_threshold", "new_creator_share", "adapt_engaged", "adapt_skipped", "break_after_min",
    "ranking_weights", "knobs",  # the serving policy: what baselines, ablations and the agent change
    "scorer_noise", "scorer_cold_noise",  # the noisy-oracle scorer's quality (the oracle baseline sets it to 0)
)
"""PipelineConfig fields the learned models do not depend on: the models and their index, and the serving policy
of stage 3's weights and stage 4. Their training log is collected with their defaults (:func:`logging_config`)."""


class MissingModelsError(RuntimeError):
    """A simulator's config serves learned models that this process was not given."""


def logging_config(cfg: FeedConfig) -> FeedConfig:
    """The system that logs the learned models' training data: ``cfg`` with the :data:`SERVING_FIELDS` at their
    defaults (noisy-oracle ranker, content retrieval, heuristic pre-ranking, the seed's weights and stage 4)."""
    default = type(cfg.pipeline)()
    return cfg.replace(pipeline={f: getattr(default, f) for f in SERVING_FIELDS})


def models_key(cfg: FeedConfig) -> str:
    """What the models of ``cfg`` depend on, as a string: :func:`logging_config`'s fields but the reward."""
    d = logging_config(cfg).to_dict()
    d.pop("reward")
    return json.dumps(d, sort_keys=True, default=str)


_PROVIDED: dict[str, dict[str, Any]] = {}
"""Models provided to this process, by :func:`models_key`: every simulator of that world shares them."""


def provide_models(cfg: FeedConfig, models: dict[str, Any]) -> None:
    """Serves ``models`` (``{kind: torch module}``, e.g. :func:`offline_data.provision.learned_models`' load) to
    every simulator built in this process (and in processes forked from it) for the world of ``cfg``, whatever
    its serving fields (:data:`SERVING_FIELDS`); a later call for the same world replaces them."""
    _PROVIDED[models_key(cfg)] = dict(models)


def forget_models() -> None:
    """Forgets every model :func:`provide_models` was given (simulators built later need them again)."""
    _PROVIDED.clear()


def served_models(cfg: FeedConfig, models: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The trained models ``cfg.pipeline`` asks for (``{kind: model}``), from ``models`` if given, else those
    provided for its world (:func:`provide_models`); None when it asks for none.

    Raises:
        MissingModelsError: it asks for models that were not given, naming the ways to give them.
    """
    kinds = cfg.pipeline.learned_models
    if not kinds:
        return None
    have = models if models is not None else _PROVIDED.get(models_key(cfg))
    missing = [k for k in kinds if k not in (have or {})]
    if missing:
        raise MissingModelsError(
            f"preset {cfg.preset!r} serves learned models ({', '.join(kinds)}) this process was not given "
            f"(missing: {', '.join(missing)}). Provision them first with offline_data.provision.ensure_rankers(cfg) "
            "(it trains them once on the world's own logs, caches them under ~/.cache/feedgym/rankers or "
            "$FEEDGYM_CACHE, and serves them to every simulator of this world), or make the env with "
            "gym.make / gym.make_vec of the registered ids, which do so; pass models= to FeedSimulator; or serve "
            "the noisy-oracle pipeline, which needs none (envs.learned.noisy_oracle_pipeline(cfg))")
    assert have is not None
    return {k: have[k] for k in kinds}


def learned_pipeline(cfg: FeedConfig) -> FeedConfig:
    """``cfg`` with the whole learned pipeline: two-tower retrieval, learned pre-ranker and ranker."""
    return cfg.replace(pipeline=LEARNED_PIPELINE)


def noisy_oracle_pipeline(cfg: FeedConfig) -> FeedConfig:
    """``cfg`` with the noisy-oracle pipeline (no trained models): for ablations and fast tests."""
    return cfg.replace(pipeline=NOISY_ORACLE_PIPELINE)


PIPELINES: tuple[str, ...] = ("preset", "learned", "noisy_oracle")
"""Choices of stages 1-3 for scripts: the preset's own, the learned pipeline, the noisy-oracle pipeline."""


def with_pipeline(cfg: FeedConfig, pipeline: str) -> FeedConfig:
    """``cfg`` served by ``pipeline`` (one of :data:`PIPELINES`; ``preset`` leaves it as it is)."""
    if pipeline == "learned":
        return learned_pipeline(cfg)
    if pipeline == "noisy_oracle":
        return noisy_oracle_pipeline(cfg)
    if pipeline != "preset":
        raise ValueError(f"pipeline={pipeline!r} is invalid: choose one of {PIPELINES}")
    return cfg

