"""docs/: the code on the pages runs, the configuration reference is current, the links resolve.

Fenced blocks tagged ``python`` are executed, top to bottom, one process per page; blocks tagged
``py`` are illustrations (they need files or machines the test does not have) and are not run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def run_page(page: Path, tmp_path: Path) -> str:
    code = "\n\n".join(python_blocks(page))
    assert code, f"{page.name} has no python blocks"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kernels_page_trains_a_toy_model_with_the_kernels(tmp_path):
    out = run_page(DOCS / "kernels_in_your_trainer.md", tmp_path)
    losses = [float(x) for x in re.findall(r"loss (-?[\d.]+)", out)]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert "change in step log-probs" in out


@pytest.mark.slow
def test_environments_page_defines_registers_plays_and_trains(tmp_path):
    out = run_page(DOCS / "environments.md", tmp_path)
    assert "Error: no tool call found" in out                            # the bad reply was answered...
    assert "| reward 1.0" in out                                        # ...and the episode solved
    assert "'reward/mean'" in out                                       # one training iteration ran


def test_config_reference_is_current():
    proc = subprocess.run([sys.executable, str(DOCS / "make_config_reference.py"), "--check"], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = (DOCS / "config_reference.md").read_text()
    for key in ("`algo.estimator`", "`rollout.layout`", "`mesh.fsdp`", "`model.hf_path`", "`seed`"):
        assert key in text


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_resolve(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        assert (page.parent / target).exists(), f"{page.name}: broken link {target}"


def test_every_page_is_linked_from_the_index():
    index = (DOCS / "README.md").read_text()
    for page in PAGES:
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"{page.name} is not linked from docs/README.md"
