"""Estimators and losses sharded over 8 host CPU devices equal the single-device result."""

import subprocess
import sys
from pathlib import Path
from tests.devices import subprocess_env

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_sharded_equal_single_device():
    env = subprocess_env(8)
    proc = subprocess.run([sys.executable, "-m", "tests.scripts.sharded_kernels"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "outputs checked" in proc.stdout
