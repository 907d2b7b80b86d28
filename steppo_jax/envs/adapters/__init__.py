"""Adapters to third-party text environments (optional extra: ``pip install 'steppo_jax[envs]'``).

Each adapter is one small module that imports its package lazily, so ``import steppo_jax.envs``
works without the extras: ``gym_text`` (gymnasium FrozenLake), ``textarena_env`` (TextArena
single-player games) and ``textworld_env`` (TextWorld games generated offline with ``tw-make``).
"""
