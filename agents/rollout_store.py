"""Finished rollouts on disk, read back instead of run again (an interrupted evaluation resumes from them)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from agents.checkpoints import set_aside
from agents.policies import policy_fingerprint
from agents.rollouts import RolloutJob, RunResult
from rankers.fileio import atomic_write_with
from rankers.types import Array


class RolloutStore:
    """Finished rollouts on disk, one ``<key>.npz`` per job, so that an evaluation that was interrupted
    resumes where it stopped and a later run that asks for the same rollout (e.g. ``main.py --shift`` after
    ``main.py``) reads it instead of simulating it again.

    The key is the sha256 of everything a rollout's result depends on: the policy's
    :func:`~agents.policies.policy_fingerprint` (class, name, parameters), the world's config, the users,
    the seed, ``finished``, the digest of the ``envs``, ``rankers``, ``offline_data`` and ``agents``
    sources and the learned rankers served (:func:`offline_data.provision.entry_digest`: their checkpoints' sha256),
    so any edit of the code, the policy or the rankers makes a new rollout. A policy without a fingerprint is
    never stored. Files are written atomically; one that cannot be read (truncated, damaged, another
    format) is moved aside as ``.stale-<n>`` with a message and the rollout is run again.
    """

    FORMAT = 1
    PACKAGES: tuple[str, ...] = ("envs", "rankers", "offline_data", "agents")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def key(self, job: RolloutJob) -> str | None:
        fp = policy_fingerprint(job.policy)
        if fp is None:
            return None
        from offline_data.provision import code_digest, entry_digest

        served = job.served
        blob = {"format": self.FORMAT, "policy": fp, "config": job.cfg.to_dict(), "users": job.n_users,
                "seed": job.seed, "finished": job.finished, "code": code_digest(packages=self.PACKAGES),
                "rankers": entry_digest(served)}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def path(self, job: RolloutJob) -> Path | None:
        key = self.key(job)
        return None if key is None else self.root / f"{job.policy.name}-{job.cfg.preset}-seed{job.seed}-{key}.npz"

    def load(self, path: Path | None) -> RunResult | None:
        """The result stored at ``path`` (a :meth:`path`), or None (none there, no fingerprint, or unreadable: set
        aside)."""
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                if meta.get("format") != self.FORMAT or meta.get("key") != path.stem.rsplit("-", 1)[-1]:
                    raise ValueError(f"format {meta.get('format')!r}, key {meta.get('key')!r}")
                arrays = {k: z[k] for k in z.files if k != "meta"}

            def group(prefix: str) -> dict[str, Array]:
                return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

            return RunResult(meta["policy"], int(meta["seed"]), group("per_user/"),
                             {k: float(v) for k, v in meta["population"].items()}, arrays["retention_by_day"],
                             arrays["knob_means"], group("knob_by_state/"), group("state_counts/"))
        except Exception as err:
            set_aside(path, f"stored rollout {path} cannot be read ({type(err).__name__}: {err})",
                      then="running it again")
            return None

    def save(self, path: Path | None, job: RolloutJob, result: RunResult) -> Path | None:
        """Stores ``job``'s ``result`` at ``path`` (its :meth:`path`; None: not stored)."""
        if path is None:
            return None
        meta = {"format": self.FORMAT, "key": path.stem.rsplit("-", 1)[-1], "policy": result.policy,
                "seed": result.seed, "population": result.population, "preset": job.cfg.preset,
                "users": job.n_users, "finished": job.finished}
        arrays = {"meta": np.asarray(json.dumps(meta)), "retention_by_day": result.retention_by_day,
                  "knob_means": result.knob_means,
                  **{f"per_user/{k}": v for k, v in result.per_user.items()},
                  **{f"knob_by_state/{k}": v for k, v in result.knob_by_state.items()},
                  **{f"state_counts/{k}": v for k, v in result.state_counts.items()}}
        # numpy's stub lets a **dict fill savez's allow_pickle flag; no key here is named that
        return atomic_write_with(path, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]


    def holds(self, job: RolloutJob) -> bool:
        """Whether the store holds ``job``'s result."""
        path = self.path(job)
        return path is not None and path.is_file()
