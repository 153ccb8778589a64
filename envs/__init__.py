"""feedgym environments. ``import envs`` registers ``feedgym/ForYouFeed-v0`` and
``feedgym/ForYouFeedDiscrete-v0`` (both take ``preset=`` and config overrides; ``gym.make_vec`` with
``vectorization_mode="vector_entry_point"`` gives the batched :class:`envs.feed_env.FeedVectorEnv`). Making
an env of a world served by learned models provisions them first (:mod:`offline_data.provision`)."""

from envs.config import ENV_VERSION, PRESETS, FeedConfig, make_config

ENV_ID = "feedgym/ForYouFeed-v0"
"""The knob-box env (:class:`envs.feed_env.FeedEnv`)."""
DISCRETE_ENV_ID = "feedgym/ForYouFeedDiscrete-v0"
"""The preset-menu env (:class:`envs.feed_env.DiscreteFeedEnv`)."""

__all__ = ["DISCRETE_ENV_ID", "ENV_ID", "ENV_VERSION", "PRESETS", "FeedConfig", "make_config", "register_envs"]


def register_envs() -> None:
    """Registers the feedgym env ids with gymnasium (idempotent).

    Their entry points are those of :mod:`offline_data.provision` (named here, imported by gymnasium only when
    an env is made): they provision the learned models the config serves (trained once on the world's own logs,
    then cached in the user's cache directory) and build :class:`envs.feed_env.FeedEnv` or its siblings, which
    never build models themselves."""
    import gymnasium as gym

    specs = {
        ENV_ID: ("offline_data.provision:make_feed_env", "offline_data.provision:make_feed_vector_env"),
        DISCRETE_ENV_ID: ("offline_data.provision:make_discrete_feed_env",
                      "offline_data.provision:make_discrete_feed_vector_env"),
    }
    for env_id, (entry, vec) in specs.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry, vector_entry_point=vec, disable_env_checker=False)


register_envs()
