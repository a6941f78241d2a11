"""Text tool-call parsers: Qwen/hermes `<tool_call>` and Mini-o3 `<grounding>`, as models actually write them."""

from __future__ import annotations

import pytest

from qzoom_client.tools import ToolCall, ToolError, parse_arguments, parse_grounding, parse_tool_calls


def test_every_tool_call_of_a_turn_is_found_in_order():
    text = ('<think>two regions</think>\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            'and <tool_call>{"name": "b", "arguments": {"y": [1, 2]}}</tool_call> done')
    assert parse_tool_calls(text) == [ToolCall("a", {"x": 1}), ToolCall("b", {"y": [1, 2]})]


def test_a_turn_without_calls_parses_to_nothing():
    assert parse_tool_calls("<answer>B</answer>") == [] and parse_grounding("<think>no</think>") == []


def test_a_last_block_cut_at_the_stop_string_is_accepted():
    assert parse_tool_calls('<tool_call>{"name": "a", "arguments": {}}\n') == [ToolCall("a", {})]
    assert parse_grounding('<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}') == [
        ToolCall("grounding", {"bbox_2d": [0, 0, 1, 1], "source": "original_image"})]


def test_missing_arguments_default_to_an_empty_object():
    assert parse_tool_calls('<tool_call>{"name": "answer"}</tool_call>') == [ToolCall("answer", {})]


@pytest.mark.parametrize("text,error", [
    ('<tool_call>{"name": "a", "arguments": {"x": 1,}}</tool_call>', "not valid JSON"),
    ('<tool_call>["a", {}]</tool_call>', "must hold a JSON object"),
    ('<tool_call>{"name": 3, "arguments": {}}</tool_call>', 'needs a "name"'),
    ('<tool_call>{"name": "a", "arguments": "{not json"}</tool_call>', "not valid JSON"),
])
def test_malformed_tool_calls_say_how_to_write_them(text, error):
    with pytest.raises(ToolError) as info:
        parse_tool_calls(text)
    assert error in info.value.text
    assert '<tool_call>{"name": "<tool>", "arguments": {...}}</tool_call>' in info.value.text


def test_malformed_grounding_shows_the_expected_form():
    with pytest.raises(ToolError, match=r'<grounding>\{"bbox_2d": \[x1, y1, x2, y2\], "source": "original_image"\}'):
        parse_grounding("<grounding>bbox_2d=[0, 0, 1, 1]</grounding>")


def test_function_calling_arguments_arrive_as_json_text_or_objects():
    assert parse_arguments("f", '{"a": 1}') == {"a": 1} == parse_arguments("f", {"a": 1})
    assert parse_arguments("f", "") == {}
    with pytest.raises(ToolError, match="the arguments of f are not valid JSON"):
        parse_arguments("f", "{a: 1}")
