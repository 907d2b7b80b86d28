"""steppo_jax: step-aligned policy optimization for agentic RL, in JAX."""
