"""Logging policies, logged datasets (transitions and impressions), their on-disk format and loaders.

    from offline_data import GaussianKnobs, collect, load_dataset, to_mdp_dataset
    ds = collect(GaussianKnobs(sigma=0.3), "tiny", n_users=16, n_steps=64, seed=0, out="runs/datasets/demo")
    ds = load_dataset("runs/datasets/demo", expected_config=make_config("tiny"))
    mdp = to_mdp_dataset(ds)

d3rlpy and Minari are imported only inside the conversion functions.
"""

from offline_data.collect import collect
from offline_data.convert import (
    d3rlpy_arrays,
    minari_to_arrays,
    minari_to_mdp_dataset,
    to_mdp_dataset,
    to_minari,
)
from offline_data.dataset import (
    SCHEMA_VERSION,
    ChecksumError,
    ConfigMismatchError,
    DatasetError,
    EnvVersionError,
    Impressions,
    LoggedDataset,
    SchemaError,
    SchemaVersionError,
    Transitions,
    load_dataset,
    read_dataset_meta,
    save_dataset,
    select_episodes,
    split_by_user,
)
from offline_data.policies import BehaviourPolicy, CallablePolicy, EpsilonMenu, GaussianKnobs, make_behaviour

__all__ = [
    "SCHEMA_VERSION", "BehaviourPolicy", "CallablePolicy", "ChecksumError", "ConfigMismatchError", "DatasetError",
    "EnvVersionError", "EpsilonMenu", "GaussianKnobs", "Impressions", "LoggedDataset", "SchemaError",
    "SchemaVersionError", "Transitions", "collect", "d3rlpy_arrays", "load_dataset", "make_behaviour",
    "minari_to_arrays", "minari_to_mdp_dataset", "read_dataset_meta", "save_dataset", "select_episodes",
    "split_by_user", "to_mdp_dataset", "to_minari",
]
