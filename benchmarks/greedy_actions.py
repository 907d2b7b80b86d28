"""What a run's greedy policy does on its held-out tasks: its most common sequences of actions.

A success rate says how often a policy wins, not how: this prints, for the greedy policy of a
run's last checkpoint (or of another policy checkpoint, such as the warm start, played with that
run's config), its success and the action sequences it plays most often over the run's held-out
tasks. Each step is the tool call's argument values (the tool's name when it has none), or
``invalid`` for a reply that is not a well-formed call. Used for the FrozenLake task of the
``steppo compare`` study (benchmarks/RESULTS.md), e.g.:

    PYTHONPATH=. .venv/bin/python benchmarks/greedy_actions.py \\
        --checkpoint benchmarks/compare/frozenlake/step_gae/seed0/checkpoints \\
        [--policy benchmarks/warm_starts/frozenlake] [--top 8]

(the grid's checkpoints are not committed: run the grid first).
"""

from __future__ import annotations

import argparse
import collections

from steppo_jax.cli import trainer_from_checkpoint
from steppo_jax.envs.tools import parse_tool_call
from steppo_jax.train.rl import load_policy_params


def action(text: str) -> str:
    """One step's action, compact: ``down`` for ``move(direction=down)``."""
    reply = parse_tool_call(text)
    if reply.kind != "call":
        return "invalid"
    return ",".join(str(v) for v in reply.call.arguments.values()) or reply.call.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run's checkpoints/ directory")
    parser.add_argument("--policy", help="play this policy checkpoint (e.g. a warm start) instead of the run's")
    parser.add_argument("--top", type=int, default=8, help="sequences to print (default: %(default)s)")
    args = parser.parse_args()

    trainer = trainer_from_checkpoint(args.checkpoint)
    params = trainer.state.params["policy"]
    if args.policy:
        params = load_policy_params(args.policy, params)
    stats, records = trainer.evaluator(params)
    played = collections.Counter()
    for r in records:
        steps = [action(m["content"]) for m in r.messages if m["role"] == "assistant"]
        played[(" ".join(steps), r.success)] += 1
    print(f"greedy success {stats['success']:.1%} on {len(records)} held-out tasks; most common action sequences:")
    for (steps, success), n in played.most_common(args.top):
        print(f"{n:4d}  {'solved' if success else 'failed'}  {steps}")


if __name__ == "__main__":
    main()
