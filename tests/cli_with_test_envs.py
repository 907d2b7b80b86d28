"""`steppo` with the test environments registered (for CLI tests in subprocesses)."""

import sys

from steppo_jax.cli import main
from steppo_jax.envs import register

register("chain_test", "tests.train_envs:ChainEnv")

if __name__ == "__main__":
    sys.exit(main())
