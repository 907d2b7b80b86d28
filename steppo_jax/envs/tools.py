"""Hermes/Qwen tool calls: parsing, validation against JSON schemas, and a base environment.

A policy reply is free text (a short reasoning sentence) followed by one tool call::

    I need the teacher of Kalo.
    <tool_call>
    {"name": "search", "arguments": {"query": "teacher of Kalo"}}
    </tool_call>

Public API (stable; adapters import it):

``parse_tool_call(text, tools=None, *, allow_final_answer=False) -> ParsedReply``
    ``tools`` are the JSON tool schemas handed to the chat template, either OpenAI style
    (``{"type": "function", "function": {"name", "description", "parameters"}}``) or the bare
    ``{"name", "description", "parameters"}`` dict; ``None`` skips validation. The result has
    ``kind`` in ``{"call", "final", "error"}``:

    - ``"call"``: ``.call`` is a :class:`ToolCall` whose arguments passed the schema;
    - ``"final"``: the reply has no tool call and ``allow_final_answer`` is true; ``.text`` is
      the reply, stripped;
    - ``"error"``: ``.error`` is a message meant to be shown to the agent as an observation.

    Tolerated: whitespace anywhere, a Markdown code fence around the JSON, a missing
    ``</tool_call>`` (generation stopped at it), text after ``</tool_call>`` (ignored), up to
    two stray characters after the JSON object
    (``}``, ``,`` ...), ``arguments`` given as a JSON-encoded string, a missing ``arguments``
    key, and integral floats (``3.0``) for ``integer`` parameters. Rejected with an error: an
    empty reply, no tool call (unless a final answer is allowed), more than one tool call, JSON
    that does not parse, a non-object call, an unknown tool, missing or unexpected arguments,
    wrong argument types, and values outside an ``enum``.

``ToolEnv``: a base class for tool-using environments. It parses every reply, turns a bad reply
(malformed, unknown tool, wrong arguments, empty, longer than ``max_reply_chars``) into an error
observation with reward ``-invalid_penalty``, ends the episode as a failure (a terminal state,
``info["ended_reason"] = "invalid_calls"``) after ``max_invalid_calls`` consecutive bad replies,
truncates it at ``max_steps``, and hands valid calls to the subclass.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Literal, Sequence

from steppo_jax.envs.base import Reset, StepResult

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
_FENCE = re.compile(r"^```[a-zA-Z]*\s*(.*?)\s*```$", re.DOTALL)
_MAX_TRAILING_JUNK = 2


@dataclasses.dataclass(frozen=True)
class ToolCall:
    """A validated call: the tool's name and its (schema-checked) arguments."""

    name: str
    arguments: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ParsedReply:
    """The outcome of :func:`parse_tool_call`; see the module docstring."""

    kind: Literal["call", "final", "error"]
    call: ToolCall | None = None
    text: str = ""
    error: str = ""


def format_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical text of a call, as the chat template and the expert policies write it."""
    body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{OPEN_TAG}\n{body}\n{CLOSE_TAG}"


def tool_schema(name: str, description: str, properties: dict[str, Any],
                required: Sequence[str] | None = None) -> dict[str, Any]:
    """An OpenAI-style function schema; every property is required unless ``required`` says."""
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": properties,
                "required": list(properties if required is None else required),
            },
        },
    }


def _error(message: str) -> ParsedReply:
    return ParsedReply(kind="error", error=message)


def _example() -> str:
    return f'{OPEN_TAG}{{"name": ..., "arguments": {{...}}}}{CLOSE_TAG}'


def parse_tool_call(text: str, tools: Sequence[dict[str, Any]] | None = None, *,
                    allow_final_answer: bool = False) -> ParsedReply:
    """Parse one reply into a tool call, a final answer or an error (see module docstring)."""
    stripped = text.strip()
    if not stripped:
        return _error("Error: empty reply. Write one tool call: " + _example())
    count = stripped.count(OPEN_TAG)
    if count == 0:
        if CLOSE_TAG not in stripped and allow_final_answer:
            return ParsedReply(kind="final", text=stripped)
        return _error("Error: no tool call found. Write one tool call: " + _example())
    if count > 1:
        return _error(f"Error: found {count} tool calls; write exactly one per reply.")
    body = stripped.split(OPEN_TAG, 1)[1]
    body = body.split(CLOSE_TAG, 1)[0].strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1)
    if not body.startswith("{"):
        return _error("Error: the tool call must be a JSON object: " + _example())
    try:
        obj, end = json.JSONDecoder().raw_decode(body)
    except json.JSONDecodeError as err:
        return _error(f"Error: invalid JSON in tool call ({err.msg} at char {err.pos}).")
    junk = body[end:].strip()
    if len(junk) > _MAX_TRAILING_JUNK:
        return _error(f"Error: unexpected text after the JSON object: {junk[:40]!r}.")
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return _error('Error: the tool call needs a "name" string: ' + _example())
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return _error('Error: "arguments" is a string that is not a JSON object.')
    if not isinstance(arguments, dict):
        return _error('Error: "arguments" must be a JSON object.')
    if tools is None:
        return ParsedReply(kind="call", call=ToolCall(obj["name"], arguments))
    return _validate(obj["name"], arguments, tools)


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool["function"] if "function" in tool else tool


def _validate(name: str, arguments: dict[str, Any],
              tools: Sequence[dict[str, Any]]) -> ParsedReply:
    schemas = {_function(t)["name"]: _function(t).get("parameters", {}) for t in tools}
    if name not in schemas:
        return _error(f"Error: unknown tool {name!r}; available tools: {', '.join(schemas)}.")
    params = schemas[name]
    properties = params.get("properties", {})
    missing = [key for key in params.get("required", []) if key not in arguments]
    if missing:
        return _error(f"Error: tool {name!r} is missing argument(s): {', '.join(missing)}.")
    if not params.get("additionalProperties", False):
        extra = [key for key in arguments if key not in properties]
        if extra:
            return _error(f"Error: tool {name!r} got unexpected argument(s): {', '.join(extra)};"
                          f" expected: {', '.join(properties) or 'none'}.")
    checked = {}
    for key, value in arguments.items():
        if key not in properties:
            checked[key] = value
            continue
        ok, value = _check_value(value, properties[key])
        if not ok:
            return _error(f"Error: argument {key!r} of tool {name!r} must be "
                          f"{_describe(properties[key])}, got {json.dumps(value)}.")
        checked[key] = value
    return ParsedReply(kind="call", call=ToolCall(name, checked))


_TYPES = {
    "string": lambda v: isinstance(v, str),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}


def _check_value(value: Any, schema: dict[str, Any]) -> tuple[bool, Any]:
    """(valid, value) with integral floats converted for integer parameters."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        if ("integer" in kinds and isinstance(value, float) and value.is_integer()
                and not any(_TYPES[k](value) for k in kinds if k in _TYPES)):
            value = int(value)
        if not any(_TYPES.get(k, lambda v: True)(value) for k in kinds):
            return False, value
    if "enum" in schema and value not in schema["enum"]:
        return False, value
    if isinstance(value, list) and "items" in schema:
        items = [_check_value(item, schema["items"]) for item in value]
        if not all(ok for ok, _ in items):
            return False, value
        value = [item for _, item in items]
    return True, value


def _describe(schema: dict[str, Any]) -> str:
    if "enum" in schema:
        return "one of " + ", ".join(json.dumps(v) for v in schema["enum"])
    kinds = schema.get("type")
    if kinds is None:
        return "a valid value"
    kinds = [kinds] if isinstance(kinds, str) else kinds
    return " or ".join(f"{'an' if k[0] in 'aeiou' else 'a'} {k}" for k in kinds)


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
    """What a subclass of :class:`ToolEnv` returns for one valid call or final answer.

    observation: text shown to the agent as a ``tool`` message (dropped when ``done``;
      kept in ``info["feedback"]``).
    reward: the step reward. done: the episode reached a terminal state.
    success: whether the task was solved (reported in ``info`` when the episode ends).
    info: extra diagnostics merged into the step's info.
    """

    observation: str
    reward: float = 0.0
    done: bool = False
    success: bool = False
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


class ToolEnv:
    """Base for environments driven by tool calls (implements the ``Environment`` protocol).

    Subclasses set ``name`` and implement ``_new_task`` (build the task, return the opening
    ``Reset``), ``_run_tool`` (one validated call -> ``ToolOutcome``), ``anchor`` (a string
    describing the current state) and ``expert_action``. ``_final_answer`` is needed only when
    ``allow_final_answer`` is true.

    Options shared by every tool environment:
      max_steps: steps before the episode is truncated.
      invalid_penalty: subtracted from the reward of a bad reply.
      max_invalid_calls: consecutive bad replies that end the episode as a failure (0 = never).
      max_reply_chars: longer replies are rejected as bad replies.
      allow_final_answer: a reply without a tool call is graded as the final answer.
    """

    name: str = "tool_env"

    def __init__(self, *, max_steps: int, invalid_penalty: float = 0.1,
                 max_invalid_calls: int = 3, max_reply_chars: int = 2000,
                 allow_final_answer: bool = False):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if max_invalid_calls < 0:
            raise ValueError(f"max_invalid_calls must be >= 0, got {max_invalid_calls}")
        if max_reply_chars < 1:
            raise ValueError(f"max_reply_chars must be >= 1, got {max_reply_chars}")
        self.max_steps = max_steps
        self.invalid_penalty = invalid_penalty
        self.max_invalid_calls = max_invalid_calls
        self.max_reply_chars = max_reply_chars
        self.allow_final_answer = allow_final_answer
        self.tools: list[dict[str, Any]] = []
        self._steps = 0
        self._invalid_streak = 0
        self._finished = True

    def _new_task(self, task_id: int, seed: int) -> Reset:
        raise NotImplementedError

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        raise NotImplementedError

    def _final_answer(self, text: str) -> ToolOutcome:
        raise NotImplementedError(f"{self.name} does not grade final answers")

    def anchor(self) -> str:
        """A string that identifies the current state (GiGPO step groups)."""
        raise NotImplementedError

    def expert_action(self) -> str:
        raise NotImplementedError

    def reset(self, task_id: int, seed: int) -> Reset:
        """Start the episode of task ``task_id`` under ``seed`` (same pair, same task)."""
        self._steps = 0
        self._invalid_streak = 0
        self._finished = False
        reset = self._new_task(task_id, seed)
        self.tools = reset.tools
        return reset

    def step(self, action_text: str) -> StepResult:
        """Parse the reply, run the call or report the error, apply the limits."""
        if self._finished:
            raise RuntimeError(f"{self.name}: step() called after the episode ended; reset() first")
        self._steps += 1
        parsed = self._parse(action_text)
        info: dict[str, Any] = {"invalid_call": parsed.kind == "error"}
        if parsed.kind == "error":
            self._invalid_streak += 1
            outcome = ToolOutcome(parsed.error, reward=-self.invalid_penalty)
            info["error"] = parsed.error
        else:
            self._invalid_streak = 0
            outcome = (self._run_tool(parsed.call) if parsed.kind == "call"
                       else self._final_answer(parsed.text))
        info.update(outcome.info)
        if 0 < self.max_invalid_calls <= self._invalid_streak and not outcome.done:
            # The agent's own failure: a terminal state (no value to bootstrap), not a cut-off.
            outcome = dataclasses.replace(outcome, done=True, success=False)
            info["ended_reason"] = "invalid_calls"
        truncated = not outcome.done and self._steps >= self.max_steps
        if truncated:
            info["truncated_reason"] = "max_steps"
        if outcome.done or truncated:
            self._finished = True
            info["success"] = outcome.done and outcome.success
            info["steps"] = self._steps
        if outcome.done:
            info["feedback"] = outcome.observation
        messages = [] if outcome.done else [{"role": "tool", "content": outcome.observation}]
        return StepResult(messages=messages, reward=float(outcome.reward), done=outcome.done,
                          truncated=truncated, anchor=self.anchor(), info=info)

    def _parse(self, action_text: str) -> ParsedReply:
        if len(action_text) > self.max_reply_chars:
            return _error(f"Error: reply too long ({len(action_text)} characters, the limit is "
                          f"{self.max_reply_chars}). Keep it short and end with one tool call.")
        return parse_tool_call(action_text, self.tools,
                               allow_final_answer=self.allow_final_answer)
