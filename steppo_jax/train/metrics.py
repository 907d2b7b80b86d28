"""What a person sees of a run: ``metrics.jsonl``, PNG curves, one line per iteration, progress
bars and ``summary.json``. Run directories may be local or URIs (``gs://…``): files are
written through ``steppo_jax.train.storage``.

Metric names are namespaced with ``/``; the plots and the per-iteration line know these (and
skip the ones a run does not log): ``reward/mean``, ``success/rate``, ``policy/kl``,
``policy/entropy``, ``policy/clip_frac``, ``value/loss``, ``value/explained_var``,
``steps/mean``, ``tokens/action``, ``time/rollout``, ``time/passes``, ``time/update``,
``eval/success``, ``eval/return``.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from steppo_jax.train.storage import as_path, write_atomic

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

PLOT_PANELS: tuple[tuple[str, ...], ...] = (
    ("reward/mean",), ("success/rate", "eval/success"), ("policy/kl",), ("policy/entropy",),
    ("policy/clip_frac",), ("value/loss",), ("value/explained_var",), ("steps/mean",),
    ("tokens/action",), ("time/rollout", "time/passes", "time/update"),
)
"""Default panels of ``plot_metrics``: the keys drawn together in each small plot."""

# (metric key, label, format) of the per-iteration line, in order.
_LINE_FIELDS = (
    ("reward/mean", "reward", "{:.3f}"), ("success/rate", "success", "{:.2f}"),
    ("eval/success", "eval", "{:.2f}"), ("policy/kl", "kl", "{:.2e}"),
    ("policy/entropy", "ent", "{:.3f}"), ("policy/clip_frac", "clip", "{:.3f}"),
    ("value/loss", "vloss", "{:.3g}"), ("value/explained_var", "ev", "{:.2f}"),
    ("tokens/action", "tok", "{:.0f}"),
)


def _scalar(key: str, value: Any) -> Any:
    """A JSON value for one metric: numbers as int/float (NaN/Inf as None), strings and bools kept."""
    if value is None or isinstance(value, (str, int)):  # int includes bool
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise TypeError(f"metric {key!r} must be a scalar, got shape {array.shape}")
    item = array.reshape(()).item()
    if isinstance(item, int):
        return item
    if isinstance(item, float):
        return item if math.isfinite(item) else None
    raise TypeError(f"metric {key!r} must be a number, string or bool, got {type(value).__name__}")


def _jsonable(value: Any, key: str = "") -> Any:
    """``value`` (nested dicts and lists of scalars) converted by ``_scalar`` leaf by leaf."""
    if isinstance(value, dict):
        return {k: _jsonable(v, f"{key}/{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{key}[{i}]") for i, v in enumerate(value)]
    return _scalar(key, value)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics JSONL file (a local path or a URI), in order.

    A truncated last line (a process killed mid-write) is skipped; a malformed line elsewhere
    raises ``ValueError`` with its line number.
    """
    lines = as_path(path).read_text(encoding="utf-8").split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: malformed metrics line: {err}") from None
    return records


class MetricsWriter:
    """Writes ``run_dir/metrics.jsonl``, one JSON line per iteration, complete after each write.

    ``resume_iteration=None`` starts a new file; an iteration number keeps the lines up to
    it and drops later ones (written after the checkpoint the run resumes from). Object stores
    have no append: each write replaces the whole file (``write_atomic``), so a reader, or a
    run killed midway, always finds whole lines.
    """

    def __init__(self, run_dir: str | os.PathLike, resume_iteration: int | None = None):
        self.path = as_path(run_dir) / METRICS_FILE
        self._lines: list[str] = []
        if resume_iteration is not None and self.path.exists():
            self._lines = [json.dumps(r) + "\n" for r in read_metrics(self.path)
                           if r.get("iteration", 0) <= resume_iteration]
        write_atomic(self.path, "".join(self._lines))
        self._closed = False

    def write(self, iteration: int, metrics: dict[str, Any]) -> dict:
        """Adds ``{"iteration": iteration, **metrics}`` to the file and returns the record as written."""
        if self._closed:
            raise ValueError(f"write to a closed MetricsWriter ({self.path})")
        record = {"iteration": int(iteration), **_jsonable(metrics)}
        self._lines.append(json.dumps(record, allow_nan=False) + "\n")
        write_atomic(self.path, "".join(self._lines))
        return record

    def close(self) -> None:
        """Refuses further writes (the file is already complete)."""
        self._closed = True

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def format_line(iteration: int, metrics: dict[str, Any]) -> str:
    """The compact one-line summary of an iteration: key metrics, then phase timings."""
    parts = [f"it {iteration:>4d}"]
    for key, label, fmt in _LINE_FIELDS:
        if key in metrics:
            value = _scalar(key, metrics[key])
            parts.append(f"{label} {'nan' if value is None else fmt.format(value)}")
    times = [(k.removeprefix("time/"), _scalar(k, v)) for k, v in metrics.items()
             if k.startswith("time/")]
    if times:
        parts.append(" ".join(f"{name} {'nan' if t is None else f'{t:.1f}s'}" for name, t in times))
    return " | ".join(parts)


def progress(total: int, desc: str, **kwargs) -> tqdm:
    """A progress bar with rate and ETA for one phase (use as a context manager).

    Hidden when stderr is not a terminal; the phase timings still reach the log through
    ``format_line``.
    """
    return tqdm(total=total, desc=desc, disable=None, dynamic_ncols=True, leave=False, **kwargs)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    points = [(r["iteration"], r[key]) for r in records
              if key in r and "iteration" in r and isinstance(r[key], (int, float))
              and not isinstance(r[key], bool)]
    if not points:
        return np.zeros(0), np.zeros(0)
    x, y = zip(*points)
    return np.asarray(x, float), np.asarray(y, float)


def plot_metrics(jsonl_path: str | os.PathLike, out_png: str | os.PathLike,
                 keys: Iterable[str | Sequence[str]] = PLOT_PANELS) -> str | os.PathLike:
    """Draws a grid of small line plots of ``keys`` over iterations and saves it as a PNG
    (rendered in memory, then written through ``write_atomic``: local paths and URIs alike).

    Each entry of ``keys`` is one panel (a key, or several keys drawn together); panels with
    no data are left out. ``eval/`` keys are drawn as points (they are logged only on
    evaluation iterations). Returns ``out_png``.
    """
    records = read_metrics(jsonl_path)
    panels = []
    for panel in keys:
        names = (panel,) if isinstance(panel, str) else tuple(panel)
        drawn = [(name, *_series(records, name)) for name in names]
        drawn = [d for d in drawn if d[1].size]
        if drawn:
            panels.append(drawn)
    cols = min(3, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows), dpi=100, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, drawn in zip(axes, panels):
        for name, x, y in drawn:
            style = dict(marker="o", linestyle="none") if name.startswith("eval/") else dict(linewidth=1.5)
            ax.plot(x, y, label=name, **style)
        ax.set_title(", ".join(name for name, *_ in drawn), fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if not panels:
        axes[0].text(0.5, 0.5, f"no metrics yet in {as_path(jsonl_path).name}",
                     ha="center", va="center")
    png = io.BytesIO()
    fig.savefig(png, format="png")
    write_atomic(out_png, png.getvalue())
    return out_png


def write_summary(run_dir: str | os.PathLike, summary: dict[str, Any]) -> str:
    """Writes ``summary`` (nested dicts of scalars; NaN/Inf become null) to ``run_dir/summary.json``;
    returns that path."""
    path = as_path(run_dir) / SUMMARY_FILE
    write_atomic(path, json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")
    return os.fspath(path)
