"""One metrics sink for every script: wandb behind it (offline by default when no API key is
configured, so nothing touches the network), or a no-op for tests. SB3 metrics reach it through
:class:`SB3SinkCallback`, so PPO and evaluation share names and prefixes
(``train/``, ``losses/``, ``eval/``, ``retention/``, ``engagement/``, ``creators/``, ``slate/``,
``knobs/``, ``perf/``).

Every scalar a sink made by :func:`make_sink` logs is also appended to ``<out_dir>/metrics.jsonl``
(:class:`RecordingSink`), a local record that :func:`read_metrics` reads back and
``agents.report.write_learning_curves`` plots, whether wandb ran online, offline or not at all.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Protocol

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


@contextlib.contextmanager
def _staging_in(path: Path) -> Iterator[None]:
    """wandb stages artifact files under ``$WANDB_DATA_DIR/artifacts/staging``: point it into the run's output
    directory for the block, unless the user set ``WANDB_DATA_DIR`` themselves."""
    if os.environ.get("WANDB_DATA_DIR"):
        yield
        return
    os.environ["WANDB_DATA_DIR"] = str(path)
    try:
        yield
    finally:
        os.environ.pop("WANDB_DATA_DIR", None)


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
        self.staging = out_dir / "wandb" / "artifact-staging"
        """Where artifacts' files are copied until they are uploaded (``wandb sync`` when offline); wandb's default
        is the user's data directory (``~/.local/share/wandb``), where every run's copies stay for good."""
        # mode is one of wandb's literal modes (checked above); mypy does not narrow a str through `in`
        self.run = wandb.init(project=project, config=config, group=group, job_type=job_type, dir=str(out_dir),
                              mode=mode, name=name, reinit="finish_previous")  # type: ignore[arg-type]
        for p in PREFIXES:
            self.run.define_metric(f"{p}*", step_metric="train/global_step")

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({**metrics, "train/global_step": step})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        import wandb

        cols: list[Any] = list(columns)
        self.run.log({key: wandb.Table(columns=cols, data=rows)})

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        """A dataset or model directory/file as a versioned artifact (uploaded on ``wandb sync`` when offline)."""
        import wandb

        art = wandb.Artifact(name, type=kind)
        with _staging_in(self.staging):  # the copies are made here, at add time
            if path.is_dir():
                art.add_dir(str(path))
            else:
                art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self) -> None:
        self.run.finish()


METRICS_FILE = "metrics.jsonl"


class RecordingSink:
    """Forwards everything to ``inner`` and appends every scalar logged to a JSON-lines file.

    One line per :meth:`log` call: ``{"step": int, "time": unix seconds, "metrics": {name: float}}``
    (non-finite values are written as ``null``). The file is opened for appending and line-buffered,
    so each line reaches the OS as one ``write`` when it is complete; a resumed run appends to the
    same file (the reader keeps the last value logged per name and step). Appends are not atomic: a
    process killed mid-write can leave a truncated last line. Appending after such a line first
    ends it with a newline, so the damage stays confined to that one line, which
    :func:`read_metrics` skips (silently when it is the last line, with a warning elsewhere).
    """

    def __init__(self, inner: MetricsSink, path: Path) -> None:
        self.inner = inner
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open("rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        self._f: IO[str] | None = self.path.open("a", buffering=1, encoding="utf-8")
        if needs_newline:
            self._f.write("\n")

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._f is not None:
            vals = {k: _scalar(v) for k, v in metrics.items()}
            self._f.write(json.dumps({"step": int(step), "time": round(time.time(), 3), "metrics": vals},
                                     allow_nan=False) + "\n")
        self.inner.log(metrics, step)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.inner.log_table(key, columns, rows)

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        self.inner.log_artifact(path, name, kind)

    def finish(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        self.inner.finish()


def _scalar(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_metrics(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """Reads a ``metrics.jsonl`` written by :class:`RecordingSink`.

    Returns:
        name -> (steps, values), sorted by step, one value per step (the last one logged, so a
        resumed run's repeated steps replace the earlier ones); ``null`` values are dropped.

    A line that does not parse is a write cut short by a crash: skipped silently when it is the
    last line, with a ``RuntimeWarning`` naming it when it is not.
    """
    lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    series: dict[str, dict[int, float]] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step, vals = int(rec["step"]), rec["metrics"]
            if not isinstance(vals, dict):
                raise TypeError("metrics is not an object")
        except (ValueError, KeyError, TypeError) as err:
            if i < len(lines) - 1:
                warnings.warn(f"{path}: skipped line {i + 1}, not a complete record ({err})", RuntimeWarning,
                              stacklevel=2)
            continue
        for k, v in vals.items():
            if v is not None:
                series.setdefault(k, {})[step] = float(v)
    out: dict[str, tuple[list[int], list[float]]] = {}
    for k, by_step in series.items():
        steps = sorted(by_step)
        out[k] = (steps, [by_step[s] for s in steps])
    return out


def make_sink(mode: str, out_dir: Path | None = None, record: bool = True, **kwargs: Any) -> MetricsSink:
    """``disabled`` gives a :class:`NoopSink`; otherwise a :class:`WandbSink` (``kwargs`` and
    ``out_dir`` passed through). With ``out_dir`` and ``record``, either is wrapped in a
    :class:`RecordingSink` writing ``out_dir / "metrics.jsonl"``."""
    inner: MetricsSink
    if mode == "disabled":
        inner = NoopSink()
    else:
        if out_dir is None:
            raise ValueError("make_sink: a wandb sink needs out_dir")
        inner = WandbSink(mode=mode, out_dir=out_dir, **kwargs)
    if out_dir is not None and record:
        return RecordingSink(inner, Path(out_dir) / METRICS_FILE)
    return inner
