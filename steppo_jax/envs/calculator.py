"""Multi-step arithmetic word problems solved with a ``calculate`` tool.

A problem tracks one quantity through a few operations ("Ana has 12 pears. She gets 5 more.
She now has 3 times as many pears. How many pears does Ana have now?"). ``calculate`` evaluates
an arithmetic expression safely (a whitelist over Python's ``ast``: numbers, + - * / // % **,
unary signs, parentheses — nothing else is ever evaluated); ``answer`` ends the episode with
reward 1 for the right number. Difficulty 1/2/3 = 2/3/4 operations on growing numbers.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import random
import re

from steppo_jax.envs.base import Reset
from steppo_jax.envs.tools import ToolCall, ToolEnv, ToolOutcome, format_tool_call, tool_schema

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPRESSION_CHARS = 200
_MAX_MAGNITUDE = 1e15
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def safe_eval(expression: str) -> int | float:
    """Evaluate an arithmetic expression; raise ``ValueError`` naming what is not allowed."""
    if len(expression) > _MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {_MAX_EXPRESSION_CHARS} characters")
    text = expression.replace("×", "*").replace("÷", "/").replace("^", "**")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot parse {expression!r}") from None
    return _eval(tree.body)


def _eval(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        value = _UNARY[type(node.op)](_eval(node.operand))
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise ValueError("exponent or base too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError("result out of range") from None
        if isinstance(value, complex):
            raise ValueError("result is not a real number")
    else:
        raise ValueError(f"{type(node).__name__} is not allowed; use numbers and + - * / ( )")
    if abs(value) > _MAX_MAGNITUDE or not math.isfinite(value):
        raise ValueError("result out of range")
    return value


def format_number(value: int | float) -> str:
    """Integers without a decimal point, other numbers with up to 6 decimals."""
    if float(value).is_integer():
        return str(int(value))
    return f"{value:.6f}".rstrip("0").rstrip(".")


_PEOPLE = (("Ana", "She"), ("Ben", "He"), ("Cleo", "She"), ("Dan", "He"), ("Eva", "She"),
           ("Finn", "He"), ("Gia", "She"), ("Hugo", "He"))
_ITEMS = ("apples", "pears", "coins", "books", "stamps", "shells", "cards", "marbles")
# (symbol, sentence template); b is the operand.
_OPS = {
    "+": "{pron} gets {b} more.",
    "-": "{pron} gives away {b}.",
    "*": "{pron} now has {b} times as many {items}.",
    "/": "{pron} splits them into {b} equal groups and keeps one group.",
}
SYSTEM_PROMPT = "Solve the problem. Use calculate for each step, then call answer."
TOOLS = [
    tool_schema("calculate", "Evaluate an arithmetic expression.",
                {"expression": {"type": "string"}}),
    tool_schema("answer", "Give the final answer.", {"answer": {"type": "number"}}),
]
_LEVELS = {1: (2, 20), 2: (3, 50), 3: (4, 100)}  # difficulty -> (operations, max start value)


def generate_problem(num_ops: int, max_start: int, rng: random.Random):
    """(question, steps) where steps are (left, symbol, right, result), exact integers."""
    name, pron = rng.choice(_PEOPLE)
    items = rng.choice(_ITEMS)
    value = rng.randint(2, max_start)
    sentences = [f"{name} has {value} {items}."]
    steps = []
    for _ in range(num_ops):
        choices = ["+", "*"] + (["-"] if value > 2 else [])
        choices += ["/"] if any(value % b == 0 for b in range(2, 6)) else []
        symbol = rng.choice(choices)
        if symbol == "+":
            b = rng.randint(1, max_start)
        elif symbol == "-":
            b = rng.randint(1, value - 1)
        elif symbol == "*":
            b = rng.randint(2, 5)
        else:
            b = rng.choice([b for b in range(2, 6) if value % b == 0])
        result = {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[symbol]
        sentences.append(_OPS[symbol].format(pron=pron, b=b, items=items))
        steps.append((value, symbol, b, result))
        value = result
    sentences.append(f"How many {items} does {name} have now?")
    return " ".join(sentences), steps


class CalculatorEnv(ToolEnv):
    """Arithmetic word problems with ``calculate`` and ``answer`` tools.

    Options: difficulty (1–3), max_steps (default: operations + 3), plus the ``ToolEnv`` options;
    a final answer without a tool call (``allow_final_answer``) is the reply's last number.
    """

    name = "calculator"

    def __init__(self, *, difficulty: int = 1, max_steps: int | None = None,
                 invalid_penalty: float = 0.1, max_invalid_calls: int = 3,
                 max_reply_chars: int = 2000, allow_final_answer: bool = False):
        if difficulty not in _LEVELS:
            raise ValueError(f"difficulty must be one of {sorted(_LEVELS)}, got {difficulty!r}")
        self.difficulty = difficulty
        self.num_ops, self.max_start = _LEVELS[difficulty]
        super().__init__(max_steps=self.num_ops + 3 if max_steps is None else max_steps,
                         invalid_penalty=invalid_penalty, max_invalid_calls=max_invalid_calls,
                         max_reply_chars=max_reply_chars, allow_final_answer=allow_final_answer)
        self.question = ""
        self.steps: list[tuple[int, str, int, int]] = []
        self._computed: list[int | float] = []

    @property
    def gold(self) -> int:
        return self.steps[-1][3]

    def _new_task(self, task_id: int, seed: int) -> Reset:
        rng = random.Random(f"{self.name}/{self.difficulty}/{task_id}/{seed}")
        self.question, self.steps = generate_problem(self.num_ops, self.max_start, rng)
        self._computed = []
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": self.question}]
        return Reset(messages=messages, tools=TOOLS, anchor=self.anchor(),
                     info={"task_id": task_id, "seed": seed, "gold": self.gold})

    def _progress(self) -> int:
        """How many of the solution's steps have been computed, in order."""
        done = 0
        while done < len(self.steps) and self.steps[done][3] in self._computed:
            done += 1
        return done

    def anchor(self) -> str:
        return json.dumps([self.question, self._progress()])

    def _run_tool(self, call: ToolCall) -> ToolOutcome:
        if call.name == "answer":
            return self._grade(call.arguments["answer"])
        try:
            value = safe_eval(call.arguments["expression"])
        except ValueError as err:
            return ToolOutcome(f"Error: {err}.", info={"calc_error": str(err)})
        self._computed.append(value)
        return ToolOutcome(format_number(value))

    def _final_answer(self, text: str) -> ToolOutcome:
        numbers = _NUMBER.findall(text)
        if not numbers:
            return ToolOutcome(f"Wrong. The answer was {self.gold}.", done=True,
                               info={"prediction": None})
        return self._grade(float(numbers[-1]))

    def _grade(self, value: float) -> ToolOutcome:
        correct = abs(value - self.gold) < 1e-6
        feedback = "Correct." if correct else f"Wrong. The answer was {self.gold}."
        return ToolOutcome(feedback, reward=float(correct), done=True, success=correct,
                           info={"prediction": value})

    def expert_action(self) -> str:
        """Compute the next step of the solution, or answer when all are computed."""
        done = self._progress()
        if done == len(self.steps):
            return (f"The answer is {self.gold}.\n"
                    + format_tool_call("answer", {"answer": self.gold}))
        left, symbol, right, _ = self.steps[done]
        expression = f"{left} {symbol} {right}"
        return f"Next I compute {expression}.\n" + format_tool_call(
            "calculate", {"expression": expression})
