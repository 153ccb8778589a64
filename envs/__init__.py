"""feedgym environments. ``import envs`` registers ``feedgym/ForYouFeed-v0`` and
``feedgym/ForYouFeedDiscrete-v0`` (both take ``preset=`` and config overrides; ``gym.make_vec`` with
``vectorization_mode="vector_entry_point"`` gives the batched :class:`envs.feed_env.FeedVectorEnv`)."""

from envs.config import ENV_VERSION, PRESETS, FeedConfig, make_config

ENV_ID = "feedgym/ForYouFeed-v0"
"""The knob-box env (:class:`envs.feed_env.FeedEnv`)."""
DISCRETE_ENV_ID = "feedgym/ForYouFeedDiscrete-v0"
"""The preset-menu env (:class:`envs.feed_env.DiscreteFeedEnv`)."""

__all__ = ["DISCRETE_ENV_ID", "ENV_ID", "ENV_VERSION", "PRESETS", "FeedConfig", "make_config", "register_envs"]


def register_envs() -> None:
    """Registers the feedgym env ids with gymnasium (idempotent)."""
    import gymnasium as gym

    specs = {
        ENV_ID: "envs.feed_env:FeedEnv",
        DISCRETE_ENV_ID: "envs.feed_env:DiscreteFeedEnv",
    }
    for env_id, entry in specs.items():
        if env_id not in gym.registry:
            vec = entry.replace("FeedEnv", "FeedVectorEnv")
            gym.register(id=env_id, entry_point=entry, vector_entry_point=vec, disable_env_checker=False)


register_envs()
