"""Shaping generated text: stop strings, ``<think>`` reasoning, tool calls, JSON output.

Every shaper is incremental: ``feed`` takes the newest text and returns what is safe to show
now, holding back a tail that could still turn out to be the start of a marker; ``finish``
returns the rest. Non-streaming responses feed everything once and finish.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEEPSEEK_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
DEEPSEEK_CALL = re.compile(
    r"<｜tool▁call▁begin｜>(.*?)<｜tool▁sep｜>(.*?)(?:<｜tool▁call▁end｜>|$)", re.DOTALL
)
DEEPSEEK_FENCED = re.compile(r"^\s*(.*?)\s*\n```(?:json)?\s*\n(.*?)\n?```\s*$", re.DOTALL)
QWEN_CALL_BEGIN = "<tool_call>"
QWEN_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
TOOL_MARKERS = (DEEPSEEK_CALLS_BEGIN, "<｜tool▁call▁begin｜>", QWEN_CALL_BEGIN)


def partial_suffix(text: str, markers: tuple[str, ...] | list[str]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of one of ``markers``."""
    best = 0
    for m in markers:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class StopMatcher:
    """Ends the output at the first stop string; the stop string itself is not shown."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched = False

    def feed(self, text: str) -> str:
        if self.matched:
            return ""
        buf = self._held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.matched, self._held = True, ""
            return buf[: min(hits)]
        keep = partial_suffix(buf, self.stops)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> str:
        rest, self._held = self._held, ""
        return rest


class ReasoningSplitter:
    """Splits ``<think>...</think>`` reasoning (Qwen3, DeepSeek-R1) from the answer.

    Reasoning is recognized only at the very start of the output, or when the prompt already
    opened the think block (DeepSeek-R1's template ends the prompt with ``<think>\\n``).
    """

    def __init__(self, prompt_text: str = ""):
        self.state = "reasoning" if prompt_text.rstrip().endswith(THINK_OPEN) else "start"
        self._held = ""

    def feed(self, text: str) -> tuple[str, str]:
        buf, self._held = self._held + text, ""
        reasoning = content = ""
        if self.state == "start":
            lead = buf.lstrip()
            if THINK_OPEN.startswith(lead) and len(lead) < len(THINK_OPEN):
                self._held = buf  # maybe the opening tag, still arriving
                return "", ""
            if lead.startswith(THINK_OPEN):
                self.state, buf = "reasoning", lead[len(THINK_OPEN) :]
            else:
                self.state = "content"
        if self.state == "reasoning":
            end = buf.find(THINK_CLOSE)
            if end < 0:
                keep = partial_suffix(buf, (THINK_CLOSE,))
                self._held = buf[len(buf) - keep :] if keep else ""
                return buf[: len(buf) - keep], ""
            reasoning, buf = buf[:end], buf[end + len(THINK_CLOSE) :].lstrip()
            self.state = "content" if buf else "after"
        elif self.state == "after":
            buf = buf.lstrip()  # the blank line between reasoning and answer
            self.state = "content" if buf else "after"
        content = buf
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        rest, self._held = self._held, ""
        if self.state == "reasoning":
            return rest, ""
        return "", rest


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def to_openai(self, index: int | None = None) -> dict:
        out = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return out if index is None else {"index": index, **out}


def _normalize_arguments(args: object) -> str:
    if isinstance(args, str):
        try:
            return json.dumps(json.loads(args), ensure_ascii=False)
        except json.JSONDecodeError:
            return args.strip()
    return json.dumps(args if args is not None else {}, ensure_ascii=False)


def parse_deepseek_tool_calls(text: str) -> list[ToolCall]:
    """DeepSeek V3 (``function<sep>NAME\\n```json\\nARGS\\n```) and V3.1/R1 (``NAME<sep>ARGS``) calls."""
    calls = []
    for head, body in DEEPSEEK_CALL.findall(text):
        fenced = DEEPSEEK_FENCED.match(body)
        if fenced:
            name, args = fenced.group(1), fenced.group(2)
        else:
            name, args = head, body
        name = name.strip()
        if name:
            calls.append(ToolCall(name, _normalize_arguments(args)))
    return calls


def parse_qwen_tool_calls(text: str) -> list[ToolCall]:
    """Hermes-style calls: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``."""
    calls = []
    for body in QWEN_CALL.findall(text):
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append(
                ToolCall(obj["name"], _normalize_arguments(obj.get("arguments", obj.get("parameters"))))
            )
    return calls


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(content before the calls, calls) from a model's output in either family's format."""
    start = _first_marker(text)
    if start < 0:
        return text, []
    tail = text[start:]
    calls = parse_deepseek_tool_calls(tail) if tail.startswith("<｜") else parse_qwen_tool_calls(tail)
    if not calls:
        return text, []
    return text[:start].rstrip(), calls


def _first_marker(text: str) -> int:
    found = [i for i in (text.find(m) for m in TOOL_MARKERS) if i >= 0]
    return min(found) if found else -1


class ToolCallDetector:
    """Streams content until a tool-call marker appears, then holds the rest for ``finish``."""

    def __init__(self) -> None:
        self._held = ""
        self._in_calls = False

    def feed(self, text: str) -> str:
        buf = self._held + text
        if self._in_calls:
            self._held = buf
            return ""
        start = _first_marker(buf)
        if start >= 0:
            self._in_calls, self._held = True, buf[start:]
            return buf[:start]
        keep = partial_suffix(buf, TOOL_MARKERS)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to show, parsed calls); an unparsable call block is shown as content."""
        rest, self._held = self._held, ""
        if not self._in_calls:
            return rest, []
        content, calls = parse_tool_calls(rest)
        return ("", calls) if calls else (content, [])


def extract_json(text: str) -> str:
    """The JSON value in ``text``: the text itself if it parses, else the first object found in it.

    Models asked for JSON often wrap it in a code fence or a sentence; without constrained
    decoding this recovers the object when there is one, and leaves the text as is otherwise.
    """
    stripped = text.strip()
    try:
        json.loads(stripped)
        return stripped
    except json.JSONDecodeError:
        pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[{\[]", text):
        try:
            _, end = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        return text[match.start() : end]
    return text


JSON_INSTRUCTION = "Respond only with a single valid JSON object, with no other text before or after it."


def json_instruction(schema: dict | None = None) -> str:
    if schema is None:
        return JSON_INSTRUCTION
    return f"{JSON_INSTRUCTION} It must follow this JSON schema: {json.dumps(schema, ensure_ascii=False)}"
