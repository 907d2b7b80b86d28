"""TextArena single-player games as tool environments: the game's text, moves as tool calls.

The agent plays with one ``play`` tool whose ``action`` is passed to the game unchanged, in the
game's own move format (``[7]`` in GuessTheNumber, ``[A C]`` in TowerOfHanoi). The game's rule
prompt opens the episode; its messages after each move (hints, boards, invalid-move warnings)
are the observation. The game decides when it ends: its final reward (1 for a win, partial
credit for some losses) is the step reward, and a reward of 1 without an invalid move is a
success. A move the game rejects is the game's business: it warns, and a second rejected move
in a row ends the game as a failure.

Games that work offline and have a scripted expert: ``GuessTheNumber-v0`` (binary search over
the hints) and ``TowerOfHanoi-v0`` (the optimal recursive solution from the current towers),
with their harder variants. Other single-player games run without an expert, except the ones
that download NLTK word lists (Wordle, Hangman, WordLadder, WordSearch) or call a hosted LLM
(TwentyQuestions, GuessWho), which fail offline, and Klondike (a syntax error in TextArena
0.7.4).

TextArena seeds Python's global ``random`` in ``reset``; the reset runs under a lock and the
global state is restored afterwards, so concurrent resets stay deterministic and the rest of the
process is not reseeded. Games that also draw random numbers during play (2048) draw them from
the global generator, so only their start is fixed by ``(task_id, seed)``.
"""

from __future__ import annotations

import random
import threading
from typing import Any

from steppo_jax.envs.base import Reset
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

SYSTEM_PROMPT = ("You are playing the single-player game {game}. Send each move with the play "
                 "tool, written in the move format the rules give.")
TOOLS = [tool_schema("play", "Make one move in the game.",
                     {"action": {"type": "string",
                                 "description": "The move in the game's format, e.g. [7]."}})]
_RESET_LOCK = threading.Lock()


def _import_textarena():
    try:
        import textarena
    except ImportError as err:
        raise ImportError("TextArenaEnv needs textarena: pip install 'steppo_jax[envs]'") from err
    return textarena


def _guess_the_number(game: Any) -> tuple[str, str]:
    """Binary search: guess the middle of the range the hints so far leave open."""
    low, high = game.min_number, game.max_number
    for guess, hint in game.state.game_state["guess_history"]:
        if hint == "higher":
            low = max(low, guess + 1)
        else:
            high = min(high, guess - 1)
    guess = (low + high) // 2
    return f"The number is between {low} and {high}, so I guess the middle.", f"[{guess}]"


def _tower_of_hanoi(game: Any) -> tuple[str, str]:
    """Optimal move: the largest disk not yet on its target goes there once every smaller disk
    is on the spare tower; until then the smaller disks' target is the spare tower."""
    where = {disk: tower for tower, disks in game.state.game_state["towers"].items()
             for disk in disks}
    target = "C"
    for disk in sorted(where, reverse=True):
        if where[disk] == target:
            continue
        spare = ({"A", "B", "C"} - {where[disk], target}).pop()
        if all(where[smaller] == spare for smaller in range(1, disk)):
            return (f"Disk {disk} is free to move onto tower {target}.",
                    f"[{where[disk]} {target}]")
        target = spare
    raise RuntimeError("textarena: the towers are already solved")


EXPERTS = {"GuessTheNumber": _guess_the_number, "TowerOfHanoi": _tower_of_hanoi}


class TextArenaEnv(ToolEnv):
    """A TextArena single-player game with a ``play`` tool.

    Options: game (a TextArena id such as ``"GuessTheNumber-v0"`` or
    ``"TowerOfHanoi-v0-medium"``; the raw variant is used, without TextArena's prompt wrappers),
    max_steps (default: twice the game's turn limit, or 50 for games without one), plus the
    ``ToolEnv`` options.
    """

    name = "textarena"

    def __init__(self, *, game: str = "GuessTheNumber-v0", max_steps: int | None = None,
                 invalid_penalty: float = 0.1, max_invalid_calls: int = 3,
                 max_reply_chars: int = 2000):
        self._ta = _import_textarena()
        if game + "-raw" not in self._ta.envs.registration.ENV_REGISTRY:
            raise ValueError(f"unknown TextArena game {game!r}")
        self.game = game
        self._game = self._ta.make(game + "-raw")
        turn_limit = getattr(self._game, "max_turns", None)
        if max_steps is None:
            max_steps = 2 * turn_limit if turn_limit else 50
        super().__init__(max_steps=max_steps, invalid_penalty=invalid_penalty,
                         max_invalid_calls=max_invalid_calls, max_reply_chars=max_reply_chars)

    def _new_task(self, task_id: int, seed: int) -> Reset:
        game_seed = random.Random(f"{self.name}/{self.game}/{task_id}/{seed}").randrange(2**31)
        with _RESET_LOCK:
            saved = random.getstate()
            try:
                self._game.reset(num_players=1, seed=game_seed)
            finally:
                random.setstate(saved)
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(game=self.game)},
                    {"role": "user", "content": self._observe()}]
        return Reset(messages=messages, tools=TOOLS, anchor=self.anchor(),
                     info={"task_id": task_id, "seed": seed, "game": self.game})

    def _observe(self) -> str:
        """The game's messages since the last call, without the echo of the agent's move."""
        _, observations = self._game.get_observation()
        player_action = self._ta.ObservationType.PLAYER_ACTION
        return "\n".join(message.strip() for _, message, kind in observations
                         if kind != player_action)

    def anchor(self) -> str:
        return f"{self.game}:{self._game.state.game_state!r}"

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        done, _ = self._game.step(call.arguments["action"])
        text = self._observe()
        if not done:
            return ToolOutcome(text)
        rewards, game_info = self._game.close()
        reward = float(rewards[0])
        invalid_move = bool(game_info[0].get("invalid_move"))
        return ToolOutcome("\n".join(filter(None, [text, game_info[0].get("reason")])),
                           reward=reward, done=True, success=reward >= 1.0 and not invalid_move,
                           info={"invalid_move": invalid_move})

    def expert_action(self) -> str:
        """The scripted expert's next move (GuessTheNumber and TowerOfHanoi only)."""
        expert = EXPERTS.get(self.game.split("-")[0])
        if expert is None:
            raise NotImplementedError(f"textarena: no scripted expert for {self.game!r}; "
                                      f"experts exist for: {', '.join(EXPERTS)}")
        reason, action = expert(self._game)
        return reason + "\n" + format_tool_call("play", {"action": action})
