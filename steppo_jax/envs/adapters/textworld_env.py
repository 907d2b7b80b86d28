"""TextWorld games through the admissible-commands interface that ALFWorld uses.

Each ``(task_id, seed)`` names a game generated offline by TextWorld's generator, the code
behind ``tw-make custom --world-size W --nb-objects N --quest-length L --seed S`` (run in
process: the same game file, without a new interpreter per game). Games are compiled once into
``cache_dir`` and reused. The agent has two tools, as in ALFWorld: ``admissible_commands`` lists
the commands that make sense in the current state, and ``execute`` runs one of them. A command
outside that list is refused with a message (not sent to the game), so meta-commands such as
``quit`` or ``restart`` cannot derail the episode. The step reward is the change of the game's
score; winning ends the episode as a success, losing as a failure. The expert follows
TextWorld's walkthrough from the current state (``policy_commands``).
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import tempfile
import warnings

from steppo_jax.envs.base import Reset
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

SYSTEM_PROMPT = ("You are playing a text adventure. Call admissible_commands to list the commands "
                 "you can use now, and execute to run one of them.")
TOOLS = [
    tool_schema("admissible_commands", "List the commands you can use now.", {}),
    tool_schema("execute", "Run one admissible command.",
                {"command": {"type": "string", "description": "e.g. open door"}}),
]


def _import_textworld():
    try:
        import jericho
        import textworld
        import textworld.generator
    except ImportError as err:
        raise ImportError("TextWorldEnv needs textworld: pip install 'steppo_jax[envs]'") from err
    # Jericho warns that it cannot track the score of generated games; TextWorld tracks it.
    warnings.filterwarnings("ignore", message=".*is not fully supported",
                            category=jericho.UnsupportedGameWarning)
    return textworld


def _clean(text: str) -> str:
    """The game's text without the prompt line (``>`` and status), the end-of-game banner
    (``*** The End ***`` or ``*** You lost! ***``) and menu, or runs of blank lines."""
    for marker in ("***", "\n>"):
        text = text.split(marker, 1)[0]
    return re.sub(r"\n\s*\n", "\n\n", text.strip())


def generate_game(path: str, seed: int, *, world_size: int, nb_objects: int,
                  quest_length: int) -> None:
    """Compile the game ``tw-make custom`` makes with these settings into ``path`` (``.z8``,
    with its ``.json`` beside it). The files are built in a private folder and moved into place,
    the ``.z8`` last, so a game file that exists is complete even with concurrent writers."""
    textworld = _import_textworld()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    workdir = tempfile.mkdtemp(dir=folder)
    try:
        options = textworld.GameOptions()
        options.seeds = seed
        options.nb_rooms = world_size
        options.nb_objects = nb_objects
        options.quest_length = quest_length
        options.path = os.path.join(workdir, "game.z8")
        game = textworld.generator.make_game(options)
        textworld.generator.compile_game(game, options)
        os.replace(os.path.join(workdir, "game.json"), os.path.splitext(path)[0] + ".json")
        os.replace(options.path, path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


class TextWorldEnv(ToolEnv):
    """Generated TextWorld games with ``admissible_commands`` and ``execute`` tools.

    Options: world_size (rooms), nb_objects (at least this many objects), quest_length
    (commands the quest needs), cache_dir (where compiled games are kept; default: a folder in
    the system's temp dir), max_steps, plus the ``ToolEnv`` options.
    """

    name = "textworld"

    def __init__(self, *, world_size: int = 3, nb_objects: int = 5, quest_length: int = 3,
                 cache_dir: str | None = None, max_steps: int = 30,
                 invalid_penalty: float = 0.1, max_invalid_calls: int = 3,
                 max_reply_chars: int = 2000):
        self._tw = _import_textworld()
        for option, value in (("world_size", world_size), ("quest_length", quest_length)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        super().__init__(max_steps=max_steps, invalid_penalty=invalid_penalty,
                         max_invalid_calls=max_invalid_calls, max_reply_chars=max_reply_chars)
        self.world_size = world_size
        self.nb_objects = nb_objects
        self.quest_length = quest_length
        self.cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "steppo_jax_textworld")
        self._env = None
        self._state = None
        self._score = 0

    def game_file(self, task_id: int, seed: int) -> str:
        """The compiled game of ``(task_id, seed)``, generated on first use."""
        key = f"w{self.world_size}_o{self.nb_objects}_q{self.quest_length}"
        game_seed = random.Random(f"{self.name}/{key}/{task_id}/{seed}").randrange(2**31)
        path = os.path.join(self.cache_dir, f"{key}_s{game_seed}.z8")
        if not os.path.exists(path):
            generate_game(path, game_seed, world_size=self.world_size,
                          nb_objects=self.nb_objects, quest_length=self.quest_length)
        return path

    def _new_task(self, task_id: int, seed: int) -> Reset:
        path = self.game_file(task_id, seed)
        self.close()
        infos = self._tw.EnvInfos(admissible_commands=True, policy_commands=True, facts=True,
                                  objective=True, description=True, score=True,
                                  max_score=True, won=True, lost=True)
        self._env = self._tw.start(path, request_infos=infos)
        self._state = self._env.reset()
        self._score = self._state.score
        opening = f"{self._state.objective}\n\n{_clean(self._state.description)}"
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": opening}]
        return Reset(messages=messages, tools=TOOLS, anchor=self.anchor(),
                     info={"task_id": task_id, "seed": seed, "game_file": path,
                           "max_score": self._state.max_score})

    def close(self) -> None:
        """Stop the game's interpreter (also done by the next ``reset``)."""
        if self._env is not None:
            self._env.close()
            self._env = None

    def anchor(self) -> str:
        facts = "\n".join(sorted(map(str, self._state.facts)))
        return "textworld:" + hashlib.sha1(facts.encode()).hexdigest()[:16]

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        admissible = self._state.admissible_commands
        if call.name == "admissible_commands":
            return ToolOutcome("Admissible commands:\n" + "\n".join(admissible))
        requested = " ".join(call.arguments["command"].split())
        command = {c.lower(): c for c in admissible}.get(requested.lower())
        if command is None:
            return ToolOutcome(f"{requested!r} is not an admissible command now; call "
                               "admissible_commands to list them.", info={"invalid_move": True})
        self._state, _, _ = self._env.step(command)
        reward, self._score = self._state.score - self._score, self._state.score
        done = bool(self._state.won or self._state.lost)
        return ToolOutcome(_clean(self._state.feedback), reward=float(reward), done=done,
                           success=bool(self._state.won), info={"invalid_move": False})

    def expert_action(self) -> str:
        """The next command of TextWorld's walkthrough from the current state."""
        plan = self._state.policy_commands
        if not plan:
            raise RuntimeError("textworld: no walkthrough from the current state "
                               "(the game can no longer be won)")
        return (f"The walkthrough's next command is {plan[0]}.\n"
                + format_tool_call("execute", {"command": plan[0]}))
