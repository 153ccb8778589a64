"""One metrics sink for every script: wandb behind it (offline by default when no API key is
configured, so nothing touches the network), or a no-op for tests. SB3 metrics reach it through
:class:`SB3SinkCallback`, so PPO and evaluation share names and prefixes
(``train/``, ``losses/``, ``eval/``, ``retention/``, ``engagement/``, ``creators/``, ``slate/``,
``knobs/``, ``perf/``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

PREFIXES: tuple[str, ...] = ("train/", "losses/", "eval/", "retention/", "engagement/", "creators/", "slate/",
                             "knobs/", "perf/")


class MetricsSink(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None: ...

    def log_artifact(self, path: Path, name: str, kind: str) -> None: ...

    def finish(self) -> None: ...


class NoopSink:
    """Discards everything (tests, ``--wandb-mode disabled``)."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        pass

    def finish(self) -> None:
        pass


def default_wandb_mode() -> str:
    """``WANDB_MODE`` if set, else ``online`` only when an API key is configured, else ``offline``."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or ((Path.home() / ".netrc").exists() and "api.wandb.ai" in (
        Path.home() / ".netrc").read_text(errors="ignore"))
    return "online" if has_key else "offline"


class WandbSink:
    """A wandb run with the project's metric names. ``mode``: online | offline | disabled."""

    def __init__(self, project: str, config: dict[str, Any], group: str, job_type: str, out_dir: Path,
                 mode: str | None = None, name: str | None = None) -> None:
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        mode = mode or default_wandb_mode()
        if mode not in ("online", "offline", "disabled"):
            raise ValueError(f"wandb mode {mode!r} is invalid: use online, offline or disabled")
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, config=config, group=group, job_type=job_type, dir=str(out_dir),
                              mode=mode, name=name, reinit="finish_previous")
        for p in PREFIXES:
            self.run.define_metric(f"{p}*", step_metric="train/global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "train/global_step": step})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        self.run.log({key: wandb.Table(columns=columns, data=rows)})

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """A dataset or model directory/file as a versioned artifact (uploaded on ``wandb sync`` when offline)."""
        import wandb

        art = wandb.Artifact(name, type=kind)
        if path.is_dir():
            art.add_dir(str(path))
        else:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


def make_sink(mode: str, **kwargs: Any) -> MetricsSink:
    """``disabled`` gives a :class:`NoopSink`; otherwise a :class:`WandbSink`."""
    if mode == "disabled":
        return NoopSink()
    return WandbSink(mode=mode, **kwargs)
