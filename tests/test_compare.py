"""``steppo compare``: the grid's bad input, the summary's figures by hand, a tiny grid run
end to end (one cell fresh, one resumed from a checkpoint, then skipped when finished), and the
study's committed grids rebuilt from their cells."""

import json
import math
import os
from pathlib import Path

import pytest

from steppo_jax import cli
from steppo_jax.train.compare import Grid, interval, run_grid, summarise
from steppo_jax.train.config import ConfigError
from steppo_jax.train.metrics import MetricsWriter, read_metrics, write_summary
from steppo_jax.train.rl import Trainer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "default.yaml")
SMALL = ["train.iterations=2", "train.eval_every=1", "train.checkpoint_every=1", "env.eval_tasks=8",
         "rollout.tasks_per_iter=2", "rollout.group_size=2", "optim.minibatches=1", "env.max_steps=2"]


def test_bad_grids_are_one_line_errors_and_overwrite_nothing(tmp_path, capsys):
    out = tmp_path / "grid"
    assert cli.main(["compare", "--config", CONFIG, "--methods", "step_gae,ppo", "--out", str(out)]) == 2
    assert "unknown method(s) ppo" in capsys.readouterr().err and not out.exists()
    assert cli.main(["compare", "--config", CONFIG, "--out", str(out), "algo.estimator=grpo"]) == 2
    assert "algo.estimator" in capsys.readouterr().err
    assert cli.main(["compare", "--config", CONFIG, "--seeds", "0,x", "--out", str(out)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert cli.main(["compare", "--config", CONFIG, "--jobs", "0", "--out", str(out)]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err and not out.exists()

    Grid(CONFIG, ["step_gae"], [0], str(out), ["train.iterations=3"]).claim()
    recorded = (out / "grid.json").read_text()
    with pytest.raises(ConfigError, match="another grid: train.iterations is 3 there, 4 here"):
        Grid(CONFIG, ["step_gae"], [0], str(out), ["train.iterations=4"]).claim()
    assert (out / "grid.json").read_text() == recorded
    Grid(CONFIG, ["step_gae", "grpo"], [0, 1], str(out), ["train.iterations=3"]).claim()  # a grid may grow
    # a grid recorded before the config had a field: valid while the field keeps its default
    grid_file = json.loads((out / "grid.json").read_text())
    assert grid_file["fields"].pop("algo.whiten_std_floor") == 0.0
    (out / "grid.json").write_text(json.dumps(grid_file))
    Grid(CONFIG, ["step_gae"], [0], str(out), ["train.iterations=3"]).claim()
    (out / "grid.json").write_text(json.dumps(grid_file))
    with pytest.raises(ConfigError, match="algo.whiten_std_floor is 0.0 there, 0.1 here"):
        Grid(CONFIG, ["step_gae"], [0], str(out), ["train.iterations=3", "algo.whiten_std_floor=0.1"]).claim()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no grid.json"):
        Grid(CONFIG, ["step_gae"], [0], str(tmp_path / "other")).claim()


def fake_cell(run_dir, curve, final, rewards, wall):
    """A finished cell's files: eval/success at the iterations of ``curve`` (0 = warm start)."""
    os.makedirs(run_dir)
    writer = MetricsWriter(run_dir)
    for it in range(-1, max(curve)):
        record = {"reward/mean": rewards[it]} if it >= 0 else {}
        if it + 1 in curve:
            record["eval/success"] = curve[it + 1]
        writer.write(it, record)
    writer.close()
    write_summary(run_dir, {"initial_success_rate": curve[0], "final_success_rate": final, "iterations": max(curve),
                            "wall_time_s": wall})


def test_summary_figures_by_hand(tmp_path):
    grid = Grid(CONFIG, ["step_gae", "grpo"], [0, 1, 2], str(tmp_path), ["train.iterations=4"])
    grid.claim()
    finals = [0.5, 0.75, 1.0]
    for seed, final in enumerate(finals):
        fake_cell(os.path.join(tmp_path, "step_gae", f"seed{seed}"), {0: 0.25, 2: 0.5, 4: final}, final,
                  [0.1, 0.2, 0.3, 0.4], 10.0 + seed)
    fake_cell(os.path.join(tmp_path, "grpo", "seed0"), {0: 0.25, 2: 0.25, 4: 0.25}, 0.25, [0.0] * 4, 5.0)
    result = summarise(grid, threshold=0.75)
    step = result["methods"]["step_gae"]
    mean, sd = 0.75, 0.25  # of 0.5, 0.75, 1.0
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 dof)
    assert step["final"] == pytest.approx({"mean": mean, "low": mean - half, "high": mean + half})
    # trapezoid over iterations 0, 2, 4 of (0.25, 0.5, final), over 4 iterations
    aucs = [((0.25 + 0.5) / 2 * 2 + (0.5 + f) / 2 * 2) / 4 for f in finals]
    assert step["auc"]["mean"] == pytest.approx(sum(aucs) / 3)
    assert step["iters_to_threshold"] == {"reached": 2, "of": 3, "mean": 4.0}
    assert step["reward_last5"]["mean"] == pytest.approx(0.25) and step["wall_s"] == pytest.approx(11.0)
    grpo = result["methods"]["grpo"]
    assert grpo["final"] == {"mean": 0.25, "low": 0.25, "high": 0.25} and grpo["iters_to_threshold"]["reached"] == 0
    assert result["finished"] == 4 and result["cells"] == 6
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[2].startswith("| step_gae | 3 | 75.0 [12.9, 100.0] |") and table[3].startswith("| grpo | 1 | 25.0 [25.0, 25.0]")
    assert json.loads((tmp_path / "compare.json").read_text())["methods"].keys() == {"step_gae", "grpo"}
    assert (tmp_path / "compare.png").stat().st_size > 10_000
    assert interval([1.0]) == {"mean": 1.0, "low": 1.0, "high": 1.0}


@pytest.mark.slow
def test_grid_runs_resumes_and_skips_finished_cells(tmp_path):
    out = str(tmp_path / "grid")
    grid = Grid(CONFIG, ["step_gae", "grpo"], [0], out, SMALL)
    grid.claim()
    resumed = next(c for c in grid.cells if c.method == "grpo")
    Trainer(grid.cell_config(resumed), log=lambda _: None).fit(stop_after=1)  # killed after its first iteration
    first = read_metrics(os.path.join(resumed.run_dir, "metrics.jsonl"))
    assert "--resume" in grid.command(resumed)
    assert run_grid(grid, jobs=2, log=lambda _: None) == []
    assert all(grid.finished(c) for c in grid.cells)
    after = read_metrics(os.path.join(resumed.run_dir, "metrics.jsonl"))
    assert [r["iteration"] for r in after] == [-1, 0, 1] and after[:2] == first  # continued, not rerun
    lines = []
    assert run_grid(grid, jobs=2, log=lines.append) == [] and lines[0].startswith("2 of 2 cells already finished")
    result = summarise(grid)
    assert set(result["methods"]) == {"step_gae", "grpo"}
    for method in result["methods"].values():
        assert sorted(method["seeds"]["0"]["curve"]) == [0, 1, 2]


STUDY = sorted(p.parent for p in (ROOT / "benchmarks" / "compare").glob("*/grid.json"))


@pytest.mark.parametrize("committed", STUDY, ids=lambda p: p.name)
def test_committed_study_regenerates_from_its_cells(committed, tmp_path, monkeypatch):
    """Every table of the study in benchmarks/RESULTS.md comes from a committed grid: its
    compare.json and compare.md rebuild, number for number, from the cells' committed files, and
    RESULTS.md shows that table."""
    out = tmp_path / committed.name
    for path in committed.rglob("*"):  # only what is committed: configs, metrics, summaries
        if path.is_file() and path.suffix in (".json", ".jsonl", ".yaml", ".md"):
            (out / path.relative_to(committed)).parent.mkdir(parents=True, exist_ok=True)
            (out / path.relative_to(committed)).write_bytes(path.read_bytes())
    recorded = json.loads((committed / "grid.json").read_text())
    before = json.loads((committed / "compare.json").read_text())
    seeds = sorted({int(s) for m in before["methods"].values() for s in m["seeds"]})
    monkeypatch.chdir(ROOT)  # the grid's config path is relative to the repository
    grid = Grid(recorded["config"], list(before["methods"]), seeds, str(out), recorded["overrides"])
    grid.claim()  # the config still loads to the grid's fields (ConfigError otherwise)
    summarise(grid, threshold=before["threshold"])
    after = json.loads((out / "compare.json").read_text())
    assert after["finished"] == before["finished"] == len(grid.cells)
    assert _close(after["methods"], before["methods"])
    table = (out / "compare.md").read_text()
    assert table == (committed / "compare.md").read_text()
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert all(row in results for row in table.splitlines()), "RESULTS.md's table differs from the grid's"


def _close(a, b) -> bool:
    """Equal JSON trees, floats to 1e-9 relative (pytest.approx takes no nested lists)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b
