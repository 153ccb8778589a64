"""feedgym environments. ``import envs`` registers ``feedgym/ForYouFeed-v0`` and
``feedgym/ForYouFeedDiscrete-v0`` (both take ``preset=`` and config overrides)."""

from envs.config import ENV_VERSION, PRESETS, FeedConfig, make_config

__all__ = ["ENV_VERSION", "PRESETS", "FeedConfig", "make_config", "register_envs"]


def register_envs() -> None:
    """Registers the feedgym env ids with gymnasium (idempotent)."""
    import gymnasium as gym

    specs = {
        "feedgym/ForYouFeed-v0": "envs.feed_env:FeedEnv",
        "feedgym/ForYouFeedDiscrete-v0": "envs.feed_env:DiscreteFeedEnv",
    }
    for env_id, entry in specs.items():
        if env_id not in gym.registry:
            vec = entry.replace("FeedEnv", "FeedVectorEnv")
            gym.register(id=env_id, entry_point=entry, vector_entry_point=vec, disable_env_checker=False)


register_envs()
