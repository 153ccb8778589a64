"""Collect a logged dataset with a behaviour policy that records its propensities.

Rolls the policy through the batched simulator and writes transitions, impressions and a
``meta.json`` sidecar (config, seed, env version, git revision, checksums) to
``runs/datasets/<name>`` (see ``offline_data/dataset.py`` for the format).

    python scripts/collect.py --preset small --behaviour gaussian --sigma 0.3 --users 256 --steps 2000
    python scripts/collect.py --preset tiny --behaviour epsilon_menu --epsilon 0.3 --no-autoreset
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import tyro

from agents.threads import one_thread_default
from envs.config import make_config
from offline_data.collect import collect
from offline_data.dataset import META_FILE, LoggedDataset
from offline_data.executor import exit_on_sigterm, make_executor
from offline_data.policies import make_behaviour
from offline_data.provision import learned_models


@dataclass
class Args:
    preset: str = "tiny"
    """World preset: tiny, small, default, large."""
    behaviour: Literal["gaussian", "epsilon_menu", "weighted_sum"] = "gaussian"
    """Behaviour policy: knobs ~ truncated normal around the seed baseline (continuous env),
    epsilon-knob menu (discrete env), or the deterministic weighted-sum baseline."""
    sigma: float = 0.3
    """Std of the (untruncated) normal for each knob, for --behaviour gaussian."""
    epsilon: float = 0.3
    """Probability of a uniformly random menu entry instead of the seed baseline, for --behaviour epsilon_menu."""
    users: int = 64
    """Simulator slots stepped together (B)."""
    steps: int | None = 500
    """Batched steps (with autoreset), or a cap on steps (without; None = the config's max_steps)."""
    autoreset: bool = True
    """Start a new user in a slot as soon as its episode ends; off = one episode per slot."""
    seed: int = 0
    """Seeds the simulator (same world and users as evaluation on this seed) and the policy's own stream."""
    name: str | None = None
    """Dataset name (one directory inside ``--root``); default ``<preset>-<behaviour>-s<seed>``."""
    root: Path = Path("runs/datasets")
    """Directory that holds the datasets."""
    overwrite: bool = False
    """Replace an existing dataset of the same name."""
    progress: bool = True
    """Show a progress bar."""
    worlds: int = 1
    """Shards: worlds logged independently (each with its share of --users and its own policy stream) and merged
    into one dataset; they run in parallel with --executor ray."""
    executor: Literal["local", "ray"] = "local"
    """Where the shards run: in this process, or on Ray (offline_data.executor); the dataset does not depend on it."""
    ray_address: str = ""
    """With --executor ray: empty = a private Ray on this machine, ``auto`` or ``host:port`` = a running cluster."""
    workers: int = 0
    """CPUs of a private Ray (0 = every core of this machine)."""


def _check_name(name: str) -> str:
    """``name`` if it names one directory inside ``--root``; else ``ValueError`` naming ``--name``. An empty name
    would write into ``--root`` itself, and a path (``../x``, ``a/b``, an absolute one) outside it or nested."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"--name {name!r} is invalid: it must be one directory name inside --root (not empty, "
                         "not '.' or '..', no '/' or '\\')")
    return name


def main(args: Args) -> LoggedDataset:
    name = _check_name(args.name if args.name is not None else f"{args.preset}-{args.behaviour}-s{args.seed}")
    out = args.root / name
    if (out / META_FILE).exists() and not args.overwrite:  # before any collecting, not after it
        raise FileExistsError(f"{out} already holds a dataset: pass --overwrite to replace it, or choose another "
                              "--name")
    cfg = make_config(args.preset)
    learned_models(cfg, progress=args.progress)  # the world's learned rankers, if it has any: built once, cached
    policy = make_behaviour(args.behaviour, sigma=args.sigma, epsilon=args.epsilon)
    argv = sys.argv[1:] if sys.argv and sys.argv[0].endswith("collect.py") else []
    with make_executor(args.executor, args.ray_address, args.workers) as ex:
        ds = collect(policy, cfg, n_users=args.users, n_steps=args.steps, seed=args.seed, autoreset=args.autoreset,
                     out=out, overwrite=args.overwrite, progress=args.progress, worlds=args.worlds, executor=ex,
                     extra_meta={"script": {"name": "scripts/collect.py", "argv": argv,
                                            "args": {k: str(v) for k, v in asdict(args).items()}}})
    c = ds.meta["counts"]
    print(f"wrote {out}: {c['transitions']} transitions, {c['impressions']} impressions, {c['episodes']} episodes "
          f"({c['terminals']} churned, {c['timeouts']} horizon, {c['cutoffs']} cut off)")
    return ds


if __name__ == "__main__":
    exit_on_sigterm()  # SIGTERM ends the job and every process it started (a private Ray too)
    one_thread_default()
    main(tyro.cli(Args))
