"""metrics.jsonl, resume truncation, plots, the per-iteration line, progress bars, summary.json."""

import io
import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from steppo_jax.train.metrics import (
    MetricsWriter, format_line, plot_metrics, progress, read_metrics, write_summary)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics(i: int) -> dict:
    return {"reward/mean": jnp.float32(0.1 * i), "success/rate": np.float64(i / 10),
            "policy/kl": 1e-3 * i, "policy/entropy": jnp.asarray(1.5 - 0.05 * i),
            "policy/clip_frac": np.float32(0.02), "value/loss": 0.5 / (i + 1),
            "value/explained_var": 0.1 * i, "tokens/action": np.int64(1000 + i),
            "time/rollout": 3.25, "time/passes": 0.5, "time/update": 1.0}


def test_writes_one_flushed_json_line_per_iteration(tmp_path):
    writer = MetricsWriter(str(tmp_path))
    record = writer.write(1, _metrics(1))
    # Flushed: readable before the writer is closed.
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == record
    assert record["iteration"] == 1
    assert record["reward/mean"] == pytest.approx(0.1) and type(record["reward/mean"]) is float
    assert record["tokens/action"] == 1001 and type(record["tokens/action"]) is int
    writer.write(2, _metrics(2))
    writer.close()
    assert [r["iteration"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [1, 2]


def test_nan_and_inf_are_null_with_the_key_kept(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(3, {"a": float("nan"), "b": jnp.float32(jnp.inf), "c": np.float64(-np.inf),
                         "d": 2.0, "phase": "update", "skipped": np.bool_(True)})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    record = json.loads(text)
    assert record == {"iteration": 3, "a": None, "b": None, "c": None, "d": 2.0,
                      "phase": "update", "skipped": True}


def test_non_scalar_metric_is_rejected(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        with pytest.raises(TypeError, match="'x' must be a scalar, got shape \\(3,\\)"):
            writer.write(1, {"x": jnp.arange(3)})


def test_resume_drops_iterations_after_the_checkpoint(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        for i in range(1, 8):
            writer.write(i, {"reward/mean": i})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 8, "rew')  # killed mid-write
    with MetricsWriter(str(tmp_path), resume_iteration=5) as writer:
        assert [r["iteration"] for r in read_metrics(writer.path)] == [1, 2, 3, 4, 5]
        writer.write(6, {"reward/mean": 60})
    records = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["iteration"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["reward/mean"] == 60


def test_new_run_starts_a_fresh_file(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, {"x": 1.0})
    with MetricsWriter(str(tmp_path)) as writer:
        writer.write(1, {"x": 2.0})
    assert read_metrics(str(tmp_path / "metrics.jsonl")) == [{"iteration": 1, "x": 2.0}]


def test_read_metrics_reports_a_malformed_middle_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iteration": 1}\nnot json\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2: malformed"):
        read_metrics(str(path))


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_writes_a_png_of_the_curves(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        for i in range(1, 21):
            metrics = _metrics(i)
            if i % 5 == 0:
                metrics["eval/success"] = i / 20
            if i == 7:
                metrics["value/loss"] = float("nan")
            writer.write(i, metrics)
    out = tmp_path / "plots" / "curves.png"
    assert plot_metrics(str(tmp_path / "metrics.jsonl"), str(out)) == str(out)
    width, height = _png_size(out)
    assert width >= 800 and height >= 600
    assert out.stat().st_size > 20_000


def test_plot_tolerates_missing_keys(tmp_path):
    with MetricsWriter(str(tmp_path)) as writer:
        for i in range(5):
            writer.write(i, {"reward/mean": i, "custom": 2 * i})
    full = tmp_path / "full.png"
    plot_metrics(str(tmp_path / "metrics.jsonl"), str(full))
    one_panel = _png_size(full)
    custom = tmp_path / "custom.png"
    plot_metrics(str(tmp_path / "metrics.jsonl"), str(custom), keys=["reward/mean", ("custom", "absent")])
    assert _png_size(custom)[0] > one_panel[0]  # two panels side by side vs one
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    plot_metrics(str(empty), str(tmp_path / "empty.png"))
    assert _png_size(tmp_path / "empty.png")[0] > 0


def test_format_line_is_compact_and_has_the_key_metrics():
    metrics = {**_metrics(4), "eval/success": 0.75, "value/loss": float("nan"), "other": 1.0}
    line = format_line(12, metrics)
    assert "\n" not in line and len(line) < 200
    assert line.startswith("it   12 | reward 0.400 | success 0.40 | eval 0.75 | kl 4.00e-03")
    for piece in ("ent 1.300", "clip 0.020", "vloss nan", "ev 0.40", "tok 1004",
                  "rollout 3.2s passes 0.5s update 1.0s"):
        assert piece in line
    assert "other" not in line
    assert format_line(1, {}) == "it    1"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_counts_with_eta_on_a_terminal():
    out = _Terminal()
    with progress(10, "rollout", file=out) as bar:
        bar.update(4)
        bar.refresh()  # tqdm redraws at most every 0.1 s
        assert bar.n == 4 and bar.total == 10
    text = out.getvalue()
    assert "rollout" in text and "4/10" in text and "<" in text  # elapsed<remaining (ETA)


def test_progress_bar_hides_off_a_terminal():
    out = io.StringIO()
    with progress(10, "update", file=out) as bar:
        bar.update(10)
    assert bar.disable and out.getvalue() == ""


def test_write_summary(tmp_path):
    path = write_summary(str(tmp_path / "run"), {
        "initial_success_rate": np.float32(0.25), "final_success_rate": jnp.float32(0.5),
        "wall_time_s": 123.4, "seeds": [0, 1], "eval": {"return": float("nan")}})
    summary = json.loads(open(path).read())
    assert summary == {"initial_success_rate": 0.25, "final_success_rate": 0.5, "wall_time_s": 123.4,
                       "seeds": [0, 1], "eval": {"return": None}}
    assert path.endswith("summary.json") and not math.isnan(summary["final_success_rate"])
