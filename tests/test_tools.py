"""Tool-call parsing and validation: tolerated variants and every rejection."""

import json

import pytest

from steppo_jax.envs.tools import ToolCall, format_tool_call, parse_tool_call, tool_schema

TOOLS = [
    tool_schema("search", "Search passages.", {"query": {"type": "string"}}),
    tool_schema("move", "Move.", {"direction": {"type": "string",
                                                "enum": ["up", "down", "left", "right"]}}),
    tool_schema("pick", "Pick items.", {"count": {"type": "integer"},
                                        "tags": {"type": "array", "items": {"type": "string"}},
                                        "note": {"type": "string"}},
                required=["count"]),
    {"name": "noop", "description": "bare schema", "parameters": {"type": "object",
                                                                  "properties": {}}},
]


def call(text, **kw):
    return parse_tool_call(text, TOOLS, **kw)


@pytest.mark.parametrize("text", [
    'Let me search.\n<tool_call>\n{"name": "search", "arguments": {"query": "a b"}}\n</tool_call>',
    '<tool_call>{"name":"search","arguments":{"query":"a b"}}</tool_call>',
    '  <tool_call>  \n\n {"name": "search", "arguments": {"query": "a b"}}  \n </tool_call>  ',
    '<tool_call>\n```json\n{"name": "search", "arguments": {"query": "a b"}}\n```\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": {"query": "a b"}}}\n</tool_call>',
    '<tool_call>\n{"name": "search", "arguments": "{\\"query\\": \\"a b\\"}"}\n</tool_call>',
    'Thinking.\n<tool_call>\n{"name": "search", "arguments": {"query": "a b"}}',
    format_tool_call("search", {"query": "a b"}),
])
def test_tolerated_variants_parse_to_the_same_call(text):
    parsed = call(text)
    assert parsed.kind == "call", parsed.error
    assert parsed.call == ToolCall("search", {"query": "a b"})


def test_integral_float_becomes_int_and_optional_args_may_be_missing():
    parsed = call(format_tool_call("pick", {"count": 3.0, "tags": ["x"]}))
    assert parsed.kind == "call"
    assert parsed.call.arguments == {"count": 3, "tags": ["x"]}
    assert type(parsed.call.arguments["count"]) is int


def test_missing_arguments_key_is_empty_arguments():
    parsed = call('<tool_call>{"name": "noop"}</tool_call>')
    assert parsed.kind == "call" and parsed.call == ToolCall("noop", {})


@pytest.mark.parametrize("text, fragment", [
    ("", "empty reply"),
    ("   \n\t ", "empty reply"),
    ("The answer is 42.", "no tool call"),
    ('{"name": "search", "arguments": {"query": "x"}} </tool_call>', "no tool call"),
    ('<tool_call>{"name": "search", "arguments": {"query": "x"</tool_call>', "invalid JSON"),
    ("<tool_call>{name: search}</tool_call>", "invalid JSON"),
    ('<tool_call>search("x")</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "search", "arguments": {"query": "x"}} and more text</tool_call>',
     "unexpected text"),
    ('<tool_call>{"arguments": {"query": "x"}}</tool_call>', '"name"'),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', '"name"'),
    ('<tool_call>{"name": "search", "arguments": [1]}</tool_call>', "must be a JSON object"),
    ('<tool_call>{"name": "search", "arguments": "not json"}</tool_call>', "not a JSON object"),
    (format_tool_call("fly", {}), "unknown tool 'fly'; available tools: search, move, pick, noop"),
    (format_tool_call("search", {}), "missing argument(s): query"),
    (format_tool_call("search", {"query": "x", "k": 2}), "unexpected argument(s): k"),
    (format_tool_call("search", {"query": 7}), "'query' of tool 'search' must be a string"),
    (format_tool_call("pick", {"count": "3"}), "must be an integer"),
    (format_tool_call("pick", {"count": 2.5}), "must be an integer"),
    (format_tool_call("pick", {"count": True}), "must be an integer"),
    (format_tool_call("pick", {"count": 1, "tags": ["a", 2]}), "'tags'"),
    (format_tool_call("move", {"direction": "north"}), 'one of "up", "down"'),
    (format_tool_call("search", {"query": "a"}) + format_tool_call("search", {"query": "b"}),
     "found 2 tool calls"),
])
def test_bad_replies_become_error_messages(text, fragment):
    parsed = call(text)
    assert parsed.kind == "error"
    assert parsed.call is None
    assert fragment in parsed.error
    assert parsed.error.startswith("Error:")


def test_final_answer_only_where_allowed():
    assert call("It is Paris.", allow_final_answer=True).kind == "final"
    assert call("  It is Paris. ", allow_final_answer=True).text == "It is Paris."
    assert call("It is Paris.").kind == "error"
    # A reply that tried to call a tool is never a final answer.
    assert call('{"name": "x"}</tool_call>', allow_final_answer=True).kind == "error"
    assert call("", allow_final_answer=True).kind == "error"


def test_without_schemas_any_name_is_accepted():
    parsed = parse_tool_call(format_tool_call("anything", {"x": [1, 2]}))
    assert parsed.kind == "call" and parsed.call == ToolCall("anything", {"x": [1, 2]})


def test_format_tool_call_round_trips_non_ascii():
    text = format_tool_call("search", {"query": "Zoë's café"})
    assert json.loads(text.split("\n")[1])["arguments"]["query"] == "Zoë's café"
    assert call(text).call.arguments == {"query": "Zoë's café"}
