"""Loading a trained agent of any kind (PPO, CQL, a CEM result) as a :class:`agents.policies.Policy`.

Above the modules of each kind (:mod:`agents.ppo`, :mod:`agents.cql`, :mod:`agents.cem`), which know their own
files; :mod:`agents.checkpoints` (what every checkpoint records) stays below them all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agents import cql, ppo
from agents.cem import mean_after
from agents.checkpoints import read_checkpoint_meta, training_config
from agents.policies import ConstantKnobs


def cem_policy(path: Path, name: str | None, steps: int | None = None) -> ConstantKnobs:
    """The constant policy of a CEM result file: its final vector, or with ``steps`` the search's mean after
    that many requests (the file's env version and config checked either way)."""
    meta = read_checkpoint_meta(path, required=("action",))
    training_config(meta, path)
    if steps is None:
        return ConstantKnobs(meta["action"], name or "cem_tuned")
    if "means" not in meta or "iter_steps" not in meta:
        raise ValueError(f"{path}@{steps}: {path} does not keep the search's mean after every iteration (tuned "
                         "before --anchor-budget existed); only its final vector can be compared")
    return ConstantKnobs(mean_after(meta["means"], int(meta["iter_steps"]), steps), name or "cem_anchor")


def load_agent(path: Path, name: str | None = None) -> Any:
    """A trained agent as a :class:`agents.policies.Policy`, from a PPO or CQL checkpoint directory
    (discrete ones answer knob vectors through their menu entry) or a CEM result file (``cem.json``;
    ``cem.json@STEPS`` = the search's mean after STEPS requests, :func:`agents.cem.mean_after`).

    The checkpoint must come from this env version and a config this code can rebuild (else
    :class:`agents.checkpoints.CheckpointMismatchError`), and its files must be intact and match each other
    (else :class:`agents.checkpoints.CorruptCheckpointError`); it can then be evaluated on any world with its
    observation size, e.g. ``<preset>-shift`` (another size is refused when the agent is bound to the
    simulator)."""
    path = Path(path)
    file, at, steps = str(path).rpartition("@")
    if at and file.endswith(".json"):  # cem.json@STEPS: the search's mean after STEPS of its requests
        if not steps.isdigit():
            raise ValueError(f"{path}: after '@' comes the number of CEM requests, not {steps!r}")
        return cem_policy(Path(file), name, int(steps))
    if path.is_file() and path.suffix == ".json":
        return cem_policy(path, name)
    if (path / ppo.META).exists() or (path / ppo.CHECKPOINT).exists():
        return ppo.load_ppo_policy(path, name)
    if (path / cql.META).exists() or (path / cql.CHECKPOINT).exists():
        return cql.load_cql_policy(path, name)
    raise FileNotFoundError(f"{path} holds no agent: expected a PPO checkpoint ({ppo.META}), a CQL checkpoint "
                            f"({cql.META}) or a cem.json file")
