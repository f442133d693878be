"""OpenAI requests -> engine sequences -> choices: chat and text completions, streamed or whole."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hetero.runtime import Runtime
from hetero.sampling import SamplingParams
from server.generation import ChatShape, Piece, generate
from server.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest
from server.state import APIError, ServerState
from server.text import extract_json, json_instruction


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    if isinstance(m.content, list):
        if any(p.type != "text" for p in m.content):
            raise APIError(400, "only text content parts are supported", param="messages")
        content: str | None = "".join(p.text for p in m.content)
    else:
        content = m.content
    d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
    # Templates concatenate content as a string, except DeepSeek's, which tests it for none on tool calls.
    d["content"] = content if content is not None or m.tool_calls else (content or "")
    if m.name:
        d["name"] = m.name
    if m.tool_call_id:
        d["tool_call_id"] = m.tool_call_id
    if m.reasoning_content is not None:
        d["reasoning_content"] = m.reasoning_content
    if m.tool_calls:
        d["tool_calls"] = [
            {
                "id": c.id or f"call_{i}",
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": c.function.arguments
                    if isinstance(c.function.arguments, str)
                    else json.dumps(c.function.arguments, ensure_ascii=False),
                },
            }
            for i, c in enumerate(m.tool_calls)
        ]
    return d


def _render_chat(runtime: Runtime, body: ChatCompletionRequest) -> tuple[list[int], str]:
    messages = [_message_dict(m) for m in body.messages]
    fmt = body.response_format
    if fmt is not None and fmt.type != "text":
        schema = fmt.json_schema.schema_ if fmt.type == "json_schema" and fmt.json_schema else None
        instruction = json_instruction(schema)
        if messages[0]["role"] == "system":
            messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}".lstrip()}
        else:
            messages.insert(0, {"role": "system", "content": instruction})
    tools = None
    if body.tools and body.tool_choice != "none":
        tools = [t.model_dump(exclude_none=True, by_alias=True) for t in body.tools]
    reserved = {"messages", "tools", "add_generation_prompt", "tokenize"}
    extra = {k: v for k, v in (body.chat_template_kwargs or {}).items() if k not in reserved}
    try:
        text = runtime.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tools=tools, tokenize=False, **extra
        )
    except Exception as e:  # template errors are caused by the messages the client sent
        raise APIError(
            400, f"the chat template could not render these messages: {e}", param="messages"
        ) from None
    return runtime.tokenizer.encode(text, add_special_tokens=False), text


def _sampling(
    runtime: Runtime, state: ServerState, body: Any, prompt_len: int, logprobs: int | None, index: int
) -> SamplingParams:
    limit = min(runtime.engine.config.max_model_len, runtime.engine.kv.num_tokens_capacity)
    room = limit - prompt_len
    param = "messages" if isinstance(body, ChatCompletionRequest) else "prompt"
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens, which leaves no room in the context of {limit} tokens; "
            "shorten it",
            param=param,
            code="context_length_exceeded",
        )
    max_tokens = body.token_limit
    if max_tokens is not None and max_tokens > room:
        raise APIError(
            400,
            f"the prompt has {prompt_len} tokens and max_tokens is {max_tokens}, together more than the "
            f"context of {limit} tokens; shorten the prompt or lower max_tokens to at most {room}",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(room, state.config.default_max_tokens or room)
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            # Below float32's resolution top_p rounds to 0 and would drop every token; 1e-6 keeps the top one.
            top_p=1.0 if body.top_p is None else max(body.top_p, 1e-6),
            top_k=max(0, body.top_k or 0),
            # Each choice gets its own stream of random numbers, all reproducible from one seed.
            seed=None if body.seed is None else (body.seed + index) % 2**64,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
        )
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _admit(state: ServerState, runtime: Runtime, count: int) -> None:
    capacity = runtime.engine.config.max_batch + state.config.max_queue
    if state.in_flight + count > capacity:
        raise APIError(
            429,
            f"the server is at capacity ({state.in_flight} sequences in flight, room for {capacity}); "
            "retry shortly",
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"Retry-After": "1"},
        )


# --------------------------------------------------------------------------- running


class _Run:
    """One request's sequences, from admission to the last piece; counted against the queue limit."""

    def __init__(
        self,
        state: ServerState,
        choices: list[tuple[list[int], SamplingParams]],
        stops: list[str],
        chat: ChatShape | None,
        prompt_tokens: int,
        priority: int = 0,
    ):
        self.state, self._held = state, 0
        runtime, worker = state.ready()
        _admit(state, runtime, len(choices))
        self.runtime, self.worker = runtime, worker
        self.choices, self.stops, self.chat = choices, stops, chat
        self.prompt_tokens, self.priority = prompt_tokens, priority
        self.arrival = time.perf_counter()
        self.completion_tokens = 0
        self._held = len(choices)
        state.in_flight += self._held
        state.metrics.prompt_tokens.inc(prompt_tokens)

    def release(self) -> None:
        self.state.in_flight -= self._held
        self._held = 0

    def __del__(self) -> None:
        # A streaming response whose client left before it started never runs pieces().
        self.release()

    async def pieces(self) -> AsyncIterator[Piece]:
        try:
            async for piece in generate(
                self.worker,
                self.state.metrics,
                self.runtime.tokenizer,
                self.choices,
                self.stops,
                self.chat,
                self.arrival,
                self.priority,
            ):
                self.completion_tokens += piece.num_tokens
                yield piece
        finally:
            self.release()

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }


async def _collect(run: _Run, request: Request) -> list[list[Piece]]:
    """All pieces of every choice; stops early (aborting the sequences) if the client goes away."""

    async def consume() -> list[list[Piece]]:
        per_choice: list[list[Piece]] = [[] for _ in run.choices]
        async for piece in run.pieces():
            per_choice[piece.index].append(piece)
        return per_choice

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
    if not work.done() or work.cancelled():
        raise asyncio.CancelledError
    return work.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _first_error(per_choice: list[list[Piece]]) -> None:
    for pieces in per_choice:
        for p in pieces:
            if p.error is not None:
                kind = "invalid_request_error" if p.error_status == 400 else "server_error"
                raise APIError(p.error_status, p.error, type=kind)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_event(message: str) -> str:
    return _sse(APIError(500, message, type="server_error").body())


# --------------------------------------------------------------------------- chat


async def chat(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    runtime, _ = state.ready()
    state.check_model(body.model)
    prompt_ids, prompt_text = _render_chat(runtime, body)
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    choices = [
        (prompt_ids, _sampling(runtime, state, body, len(prompt_ids), logprobs, i)) for i in range(body.n)
    ]
    parse_tools = bool(body.tools) and body.tool_choice != "none"
    run = _Run(
        state, choices, body.stop_strings, ChatShape(prompt_text, parse_tools), len(prompt_ids), body.priority
    )
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    tok = runtime.tokenizer
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _streaming(_chat_events(run, meta, body, include_usage, tok))
    per_choice = await _collect(run, request)
    _first_error(per_choice)
    out = []
    want_json = body.response_format is not None and body.response_format.type != "text"
    for i, pieces in enumerate(per_choice):
        content = "".join(p.text for p in pieces)
        reasoning = "".join(p.reasoning for p in pieces).strip("\n")
        calls = [c for p in pieces for c in p.tool_calls]
        if want_json and not calls:
            content = extract_json(content)
        message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        lps = [lp for p in pieces for lp in p.logprobs]
        out.append(
            {
                "index": i,
                "message": message,
                "logprobs": _chat_logprobs(tok, lps) if body.logprobs else None,
                "finish_reason": pieces[-1].finish_reason if pieces else "stop",
            }
        )
    return JSONResponse(
        {**meta, "object": "chat.completion", "choices": out, "usage": run.usage(run.completion_tokens)}
    )


async def _chat_events(
    run: _Run, meta: dict, body: ChatCompletionRequest, include_usage: bool, tok: Any
) -> AsyncIterator[str]:
    base = {**meta, "object": "chat.completion.chunk"}
    if include_usage:
        base["usage"] = None
    for i in range(len(run.choices)):
        first = {
            "index": i,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield _sse({**base, "choices": [first]})
    async for p in run.pieces():
        if p.error is not None:
            yield _error_event(p.error)
            break
        delta: dict[str, Any] = {}
        if p.reasoning:
            delta["reasoning_content"] = p.reasoning
        if p.text:
            delta["content"] = p.text
        if p.tool_calls:
            delta["tool_calls"] = [c.to_openai(k) for k, c in enumerate(p.tool_calls)]
        if not delta and not p.finish_reason and not (body.logprobs and p.logprobs):
            continue
        choice = {
            "index": p.index,
            "delta": delta,
            "logprobs": _chat_logprobs(tok, p.logprobs) if body.logprobs else None,
            "finish_reason": p.finish_reason,
        }
        yield _sse({**base, "choices": [choice]})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": run.usage(run.completion_tokens)})
    yield "data: [DONE]\n\n"


def _chat_logprobs(tok: Any, lps: list) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        text = tok.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]} for t, lp, top in lps]
    }


# --------------------------------------------------------------------------- completions


async def completion(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    runtime, _ = state.ready()
    state.check_model(body.model)
    tok = runtime.tokenizer
    vocab = runtime.spec.vocab_size
    choices, prompt_tokens = [], 0
    for prompt in body.prompts:
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
        else:
            ids = list(prompt)
            if any(not 0 <= t < vocab for t in ids):
                raise APIError(
                    400, f"prompt holds token ids outside the vocabulary of {vocab}", param="prompt"
                )
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompt_tokens += len(ids)
        for _ in range(body.n):
            choices.append((ids, _sampling(runtime, state, body, len(ids), body.logprobs, len(choices))))
    run = _Run(state, choices, body.stop_strings, None, prompt_tokens, body.priority)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _streaming(_completion_events(run, meta, body, include_usage, tok))
    per_choice = await _collect(run, request)
    _first_error(per_choice)
    out = []
    for i, pieces in enumerate(per_choice):
        lps = [lp for p in pieces for lp in p.logprobs]
        out.append(
            {
                "index": i,
                "text": "".join(p.text for p in pieces),
                "logprobs": _completion_logprobs(tok, lps, 0) if body.logprobs is not None else None,
                "finish_reason": pieces[-1].finish_reason if pieces else "stop",
            }
        )
    usage = run.usage(run.completion_tokens)
    return JSONResponse({**meta, "object": "text_completion", "choices": out, "usage": usage})


async def _completion_events(
    run: _Run, meta: dict, body: CompletionRequest, include_usage: bool, tok: Any
) -> AsyncIterator[str]:
    base = {**meta, "object": "text_completion"}
    if include_usage:
        base["usage"] = None
    offsets = [0] * len(run.choices)
    async for p in run.pieces():
        if p.error is not None:
            yield _error_event(p.error)
            break
        if not p.text and not p.finish_reason and not (body.logprobs is not None and p.logprobs):
            continue
        lp = None
        if body.logprobs is not None:
            lp = _completion_logprobs(tok, p.logprobs, offsets[p.index])
            offsets[p.index] += sum(len(t) for t in lp["tokens"])
        choice = {"index": p.index, "text": p.text, "logprobs": lp, "finish_reason": p.finish_reason}
        yield _sse({**base, "choices": [choice]})
    if include_usage:
        yield _sse({**base, "choices": [], "usage": run.usage(run.completion_tokens)})
    yield "data: [DONE]\n\n"


def _completion_logprobs(tok: Any, lps: list, offset: int) -> dict:
    tokens, chosen, tops, offsets = [], [], [], []
    for token_id, logprob, top in lps:
        text = tok.decode([token_id])
        tokens.append(text)
        chosen.append(logprob)
        tops.append({tok.decode([i]): v for i, v in top})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": chosen, "top_logprobs": tops, "text_offset": offsets}


def _streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
