"""A thinking-with-images agent loop against qzoom-service, with a scripted "model".

    .venv/bin/qzoom serve &                                   # embedded default model on 127.0.0.1:9000
    .venv/bin/python clients/examples/agent_loop.py --addr 127.0.0.1:9000

The assistant turns are fixed strings in the Qwen/hermes format a real model would emit: zoom into the
image (qwen3vl profile: 0-1000 boxes, img_idx), zoom into that crop, ask the service, answer. The loop
is what a real one does: parse the `<tool_call>`s of each turn, run them through a ToolSession, append
the result to the conversation as a `<tool_response>` user turn holding the crop, go on. Swap
`scripted_model` for a call to your model (e.g. vLLM's OpenAI-compatible server) to make it real.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qzoom_client import QZoomClient
from qzoom_client.tools import ToolError, ToolResult, ToolSession

DEMO = Path(__file__).resolve().parents[2] / "examples" / "demo.png"
QUESTION = "Which digit is in the small red box?"
TURNS = [
    '<think>The red box is small, in the lower right. Zoom in there.</think>\n<tool_call>\n'
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [700, 650, 950, 950], "label": "red box", "img_idx": 0}}\n'
    '</tool_call>',
    '<think>The box is in the middle of image 1; zoom into that crop.</think>\n<tool_call>\n'
    '{"name": "image_zoom_in_tool", "arguments": {"bbox_2d": [400, 400, 620, 640], "label": "digit", "img_idx": 1}}\n'
    '</tool_call>',
    '<think>Ask the perception service to read it.</think>\n<tool_call>\n'
    '{"name": "answer", "arguments": {"question": "Which digit is in the red box?"}}\n</tool_call>',
    "<answer>The digit is the one the service read in the last tool response.</answer>",
]


def scripted_model(messages: list[dict]) -> str:
    """The next assistant turn. A real agent sends `messages` to its model here."""
    return TURNS[sum(m["role"] == "assistant" for m in messages)]


def system_prompt(session: ToolSession) -> str:
    tools = "\n".join(json.dumps({"type": "function", "function": t}) for t in session.tool_definitions())
    return ("You are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with the user "
            f"query.\n\n<tools>\n{tools}\n</tools>\n\nFor each function call, return a json object with function "
            'name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
            '"arguments": <args-json-object>}\n</tool_call>')


def tool_response(outcomes: list[ToolResult | ToolError]) -> dict:
    """Tool results go back in a user turn, each in <tool_response> tags, with the crop image inside."""
    content = []
    for outcome in outcomes:
        content.append({"type": "text", "text": "<tool_response>\n"})
        if isinstance(outcome, ToolResult) and outcome.png is not None:
            content.append({"type": "image", "image": outcome.data_url()})
        content.append({"type": "text", "text": f"{outcome.text}\n</tool_response>"})
    return {"role": "user", "content": content}


def step_record(turn: str, outcomes: list[ToolResult | ToolError]) -> dict:
    keep = ("crop_id", "img_idx", "box", "answer", "route")
    return {"assistant": turn, "results": [
        {"error": o.text, "code": o.code} if isinstance(o, ToolError)
        else {"text": o.text, **{k: v for k, v in o.data.items() if k in keep}}
        for o in outcomes]}


def run(addr: str, image: Path, max_turns: int = 8) -> dict:
    with QZoomClient(addr, timeout=120) as client:
        session = ToolSession(client, "qwen3vl")
        first = session.add_image(image)
        messages = [{"role": "system", "content": system_prompt(session)},
                    {"role": "user", "content": [{"type": "image", "image": str(image)},
                                                 {"type": "text", "text": QUESTION}]}]
        steps = []
        for _ in range(max_turns):
            turn = scripted_model(messages)
            messages.append({"role": "assistant", "content": turn})
            outcomes = session.call_text(turn)
            steps.append(step_record(turn, outcomes))
            if not outcomes:  # no tool call: the model answered
                break
            messages.append(tool_response(outcomes))
        return {"image": {"path": str(image), "image_id": first.image_id, "width": first.width, "height": first.height},
                "question": QUESTION, "steps": steps, "images_in_conversation": len(session.images),
                "messages": len(messages)}


def print_trajectory(trajectory: dict) -> None:
    img = trajectory["image"]
    print(f"[user] <image 0: {img['width']}x{img['height']}> {trajectory['question']}")
    for step in trajectory["steps"]:
        print(f"[assistant] {' '.join(step['assistant'].split())}")
        for r in step["results"]:
            if "error" in r:
                print(f"[tool] {r['error']}")
            elif "box" in r:
                box = [round(v) for v in r["box"]["original"]]
                print(f"[tool] {r['text']} crop_id={r['crop_id']} box in original pixels={box}")
            else:  # the answer tool; ascii() keeps whatever a (tiny or random) model said printable
                print(f"[tool] answer={ascii(r['answer'])[:80]} route={r['route']}")
    print(f"[done] {len(trajectory['steps'])} turns, {trajectory['images_in_conversation']} images in the conversation")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--addr", default="127.0.0.1:9000", help="HOST:PORT of qzoom serve (default 127.0.0.1:9000)")
    ap.add_argument("--image", type=Path, default=DEMO, help="the question image (default: examples/demo.png)")
    ap.add_argument("--json", action="store_true", help="print the trajectory as one JSON object")
    args = ap.parse_args(argv)
    try:
        trajectory = run(args.addr, args.image)
    except ToolError as e:  # the service is unreachable or refused the image
        print(f"agent_loop: {e.code}: {e.message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(trajectory))
    else:
        print_trajectory(trajectory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
