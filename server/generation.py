"""From engine deltas to the text, reasoning, tool calls and logprobs of each choice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from hetero.sampling import SamplingParams
from hetero.tokenizer import Tokenizer
from server.metrics import Metrics
from server.text import ReasoningSplitter, StopMatcher, ToolCall, ToolCallDetector
from server.worker import Delta, EngineWorker

TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # chosen id, its logprob, top (id, logprob)


@dataclass
class Piece:
    """What one choice adds to the response after one engine step."""

    index: int
    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    error_status: int = 500
    num_tokens: int = 0  # tokens this piece stands for, shown or not


@dataclass
class ChatShape:
    """How chat output is split: reasoning first (when the model thinks), tool calls last."""

    prompt_text: str
    parse_tools: bool


class ChoiceOutput:
    """Detokenizes one sequence and applies stop strings, reasoning and tool-call parsing."""

    def __init__(self, index: int, tokenizer: Tokenizer, stops: list[str], chat: ChatShape | None):
        self.index = index
        self.decoder = tokenizer.incremental_decoder(skip_special_tokens=True)
        self.stops = StopMatcher(stops)
        self.reasoning = ReasoningSplitter(chat.prompt_text) if chat else None
        self.tools = ToolCallDetector() if chat and chat.parse_tools else None
        self.num_tokens = 0
        self.finish_reason: str | None = None
        self.last_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, delta: Delta) -> Piece:
        if delta.error is not None:
            self.finish_reason = "error"
            return Piece(
                self.index, finish_reason="error", error=delta.error, error_status=delta.error_status
            )
        self.num_tokens += len(delta.token_ids)
        text = "".join(self.decoder.feed(t) for t in delta.token_ids)
        finish = delta.finish_reason
        if finish is not None:
            text += self.decoder.flush()
        shown = self.stops.feed(text)
        if self.stops.matched:
            finish = "stop"
        elif finish is not None:
            shown += self.stops.finish()
        logprobs = [(t, lp, top) for t, (lp, top) in zip(delta.token_ids, delta.logprobs)]
        piece = self._shape(shown, final=finish is not None)
        piece.logprobs, piece.finish_reason = logprobs, finish
        piece.num_tokens = len(delta.token_ids)
        if finish is not None:
            piece.finish_reason = "tool_calls" if piece.tool_calls else finish
            self.finish_reason = piece.finish_reason
        return piece

    def _shape(self, text: str, final: bool) -> Piece:
        piece = Piece(self.index)
        if self.reasoning is None:
            piece.text = text
            return piece
        piece.reasoning, content = self.reasoning.feed(text)
        if final:
            more_reasoning, more_content = self.reasoning.finish()
            piece.reasoning += more_reasoning
            content += more_content
        if self.tools is not None:
            content = self.tools.feed(content)
            if final:
                rest, piece.tool_calls = self.tools.finish()
                content += rest
        piece.text = content
        return piece


async def generate(
    worker: EngineWorker,
    metrics: Metrics,
    tokenizer: Tokenizer,
    choices: list[tuple[list[int], SamplingParams]],
    stops: list[str],
    chat: ChatShape | None,
    arrival: float,
    priority: int = 0,
) -> AsyncIterator[Piece]:
    """Run every choice as its own sequence and yield their pieces as the engine makes them.

    Leaving early (a client that disconnects cancels the task) aborts the sequences still
    running, which frees their KV blocks at the engine's next turn.
    """
    queue: asyncio.Queue[Delta] = asyncio.Queue()
    outputs = [ChoiceOutput(i, tokenizer, stops, chat) for i in range(len(choices))]
    handles = [worker.submit(ids, params, queue, i, priority) for i, (ids, params) in enumerate(choices)]
    remaining = len(handles)
    try:
        while remaining:
            delta = await queue.get()
            out = outputs[delta.tag]
            if out.finished:
                continue
            _observe_latency(metrics, out, delta, arrival)
            piece = out.feed(delta)
            if out.finished:
                remaining -= 1
                metrics.requests.labels(piece.finish_reason).inc()
                # A stop string ended it before the engine did.
                worker.cancel(handles[delta.tag], "stop")
            yield piece
    finally:
        for handle in handles:
            worker.cancel(handle)


def _observe_latency(metrics: Metrics, out: ChoiceOutput, delta: Delta, arrival: float) -> None:
    if not delta.token_ids:
        return
    now = time.perf_counter()
    if out.last_token_time is None:
        metrics.ttft.observe(now - arrival)
    else:
        gap = (now - out.last_token_time) / len(delta.token_ids)
        for _ in delta.token_ids:
            metrics.itl.observe(gap)
    out.last_token_time = now
    metrics.generation_tokens.inc(len(delta.token_ids))
