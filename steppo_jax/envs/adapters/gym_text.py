"""Gymnasium FrozenLake as a text environment: the grid as plain text, moves as tool calls.

Each task is a random map from gymnasium's ``generate_random_map`` (always solvable), drawn from
``(task_id, seed)``; gymnasium's own ``render_mode="ansi"`` marks the player with terminal colour
codes, so the grid is rendered here as plain letters instead. Reaching the goal gives gymnasium's
reward 1 and ends the episode as a success; falling into a hole ends it as a failure. With
``is_slippery`` the move may slide sideways (gymnasium's dynamics, seeded by the task).
Symbols: ``P`` you, ``S`` start, ``F`` frozen (safe), ``H`` hole, ``G`` goal.
"""

from __future__ import annotations

import collections
import random

from steppo_jax.envs.base import Reset
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

# gymnasium's action ids and the (row, column) step of each move.
ACTIONS = {"left": 0, "down": 1, "right": 2, "up": 3}
DELTAS = {"left": (0, -1), "down": (1, 0), "right": (0, 1), "up": (-1, 0)}
SYSTEM_PROMPT = ("You are on a frozen lake. Walk from the start to the goal G without falling "
                 "into a hole H. Symbols: P you, S start, F frozen (safe), H hole, G goal. "
                 "Use move.")
TOOLS = [tool_schema("move", "Move one square on the lake.",
                     {"direction": {"type": "string", "enum": list(ACTIONS)}})]


def _import_gymnasium():
    try:
        import gymnasium
        from gymnasium.envs.toy_text.frozen_lake import generate_random_map
    except ImportError as err:
        raise ImportError("FrozenLakeEnv needs gymnasium: pip install 'steppo_jax[envs]'") from err
    return gymnasium, generate_random_map


class FrozenLakeEnv(ToolEnv):
    """FrozenLake with a ``move`` tool and a BFS expert.

    Options: size (the map is size x size), p_frozen (probability that a cell is frozen rather
    than a hole), is_slippery (gymnasium's slippery ice), max_steps (default: size * size),
    plus the ``ToolEnv`` options.
    """

    name = "frozenlake"

    def __init__(self, *, size: int = 4, p_frozen: float = 0.8, is_slippery: bool = False,
                 max_steps: int | None = None, invalid_penalty: float = 0.1,
                 max_invalid_calls: int = 3, max_reply_chars: int = 2000):
        self._gym, self._generate_map = _import_gymnasium()
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size}")
        if not 0.0 < p_frozen <= 1.0:
            raise ValueError(f"p_frozen must be in (0, 1], got {p_frozen}")
        super().__init__(max_steps=size * size if max_steps is None else max_steps,
                         invalid_penalty=invalid_penalty, max_invalid_calls=max_invalid_calls,
                         max_reply_chars=max_reply_chars)
        self.size = size
        self.p_frozen = p_frozen
        self.is_slippery = is_slippery
        self.desc: list[str] = []
        self.position = (0, 0)
        self._env = None

    def _new_task(self, task_id: int, seed: int) -> Reset:
        task_seed = random.Random(
            f"{self.name}/{self.size}/{self.p_frozen}/{task_id}/{seed}").randrange(2**31)
        self.desc = self._generate_map(size=self.size, p=self.p_frozen, seed=task_seed)
        # Our step limit binds first: gymnasium's TimeLimit only counts valid moves.
        self._env = self._gym.make("FrozenLake-v1", desc=self.desc, is_slippery=self.is_slippery,
                                   max_episode_steps=self.max_steps)
        state, _ = self._env.reset(seed=task_seed)
        self.position = divmod(int(state), self.size)
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": self.render()}]
        return Reset(messages=messages, tools=TOOLS, anchor=self.anchor(),
                     info={"task_id": task_id, "seed": seed, "map": list(self.desc)})

    def render(self) -> str:
        """The map as rows of letters, with ``P`` on the player's cell."""
        rows = [list(row) for row in self.desc]
        row, col = self.position
        rows[row][col] = "P"
        return "\n".join("".join(r) for r in rows)

    def anchor(self) -> str:
        return self.render()

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        direction = call.arguments["direction"]
        before = self.position
        state, reward, terminated, _, _ = self._env.step(ACTIONS[direction])
        self.position = divmod(int(state), self.size)
        cell = self.desc[self.position[0]][self.position[1]]
        if cell == "G":
            return ToolOutcome("You reached the goal.", reward=float(reward), done=True,
                               success=True)
        if terminated:
            return ToolOutcome("You fell into a hole.", reward=float(reward), done=True)
        moved = next((d for d, (dr, dc) in DELTAS.items()
                      if (before[0] + dr, before[1] + dc) == self.position), None)
        if moved is None:
            text = f"You tried to move {direction} but stayed in place (edge of the lake)."
        elif moved != direction:
            text = f"You tried to move {direction} but slid {moved}."
        else:
            text = f"You moved {direction}."
        return ToolOutcome(f"{text}\n{self.render()}", reward=float(reward))

    def _shortest_path(self) -> list[str]:
        """Moves of a shortest hole-free path from the player to the goal (BFS)."""
        parents = {self.position: None}
        frontier = collections.deque([self.position])
        while frontier:
            cell = frontier.popleft()
            if self.desc[cell[0]][cell[1]] == "G":
                moves = []
                while parents[cell] is not None:
                    cell, move = parents[cell]
                    moves.append(move)
                return moves[::-1]
            for move, (dr, dc) in DELTAS.items():
                nxt = (cell[0] + dr, cell[1] + dc)
                if (0 <= nxt[0] < self.size and 0 <= nxt[1] < self.size
                        and self.desc[nxt[0]][nxt[1]] != "H" and nxt not in parents):
                    parents[nxt] = (cell, move)
                    frontier.append(nxt)
        return []

    def expert_action(self) -> str:
        """The first move of a shortest safe path to the goal (optimal unless slippery)."""
        move = self._shortest_path()[0]
        return (f"Moving {move} follows a shortest safe path to the goal.\n"
                + format_tool_call("move", {"direction": move}))
