"""The engine thread: one thread owns the Engine; asyncio handlers talk to it through queues.

Requests go in through a locked inbox that the thread drains before every step, so new
sequences join the running batch at the next step and ``Engine.add_request`` / ``abort`` are
only ever called from this thread. Tokens come out with one ``call_soon_threadsafe`` per
step, which fans them out to per-request ``asyncio.Queue``s on the event loop.

With the GPU part split over several GPUs (``hetero.distributed``) this worker runs on rank 0,
and before every step it broadcasts the requests it just admitted or ended; the other ranks
(``follow``) apply the same commands to their engines and run the same step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hetero.distributed import SINGLE, Parallel
from hetero.engine import Engine, RequestError, Sequence
from hetero.errors import HeteroError
from hetero.sampling import SamplingParams

log = logging.getLogger("hetero.server")


@dataclass
class Delta:
    """What one engine step produced for one sequence (or why it ended without tokens)."""

    tag: Any
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" once the engine has finished it
    error: str | None = None  # the request could not run; nothing more will come
    error_status: int = 500  # 400 when the request itself was at fault


@dataclass
class Handle:
    """The event-loop side of one sequence: where its deltas go and how to cancel it."""

    prompt_ids: list[int]
    params: SamplingParams
    queue: asyncio.Queue[Delta]
    tag: Any
    priority: int = 0  # lower runs first; see Engine.add_request
    seq: Sequence | None = None  # set by the engine thread once admitted
    done: bool = False  # no more deltas will be delivered


class EngineWorker:
    """Runs ``engine.step()`` in one dedicated thread while there is work, sleeping otherwise."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, parallel: Parallel = SINGLE):
        self.engine, self.loop = engine, loop
        self.parallel = parallel
        self._applied: list[tuple] = []  # this round's commands, for the other ranks
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, Handle]] = deque()
        self._live: dict[int, Handle] = {}  # sequence id -> handle, touched by the engine thread only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="hetero-engine", daemon=True)

    # ------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)

    @property
    def num_pending(self) -> int:
        """Requests handed in that the engine thread has not picked up yet."""
        return sum(1 for kind, _ in list(self._inbox) if kind == "add")

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, queue: asyncio.Queue, tag: Any, priority: int = 0
    ) -> Handle:
        handle = Handle(list(prompt_ids), params, queue, tag, priority)
        self._post("add", handle)
        return handle

    def cancel(self, handle: Handle, reason: str = "abort") -> None:
        """Stop generating for ``handle`` and free its KV blocks (a client left, or a stop string matched)."""
        if not handle.done:
            handle.done = True
            self._post(reason, handle)

    def _post(self, kind: str, handle: Handle) -> None:
        with self._cond:
            self._inbox.append((kind, handle))
            self._cond.notify()

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        scheduler = self.engine.scheduler
        while True:
            with self._cond:
                while not self._inbox and not scheduler.has_work and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self.parallel.broadcast(None)  # the other ranks stop too
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            out = [d for kind, h in commands if (d := self._apply(kind, h)) is not None]
            self.parallel.broadcast(self._applied)
            self._applied = []
            if scheduler.has_work:
                out += self._step()
            if out:
                self._deliver(out)

    def _apply(self, kind: str, handle: Handle) -> tuple[Handle, Delta] | None:
        if kind == "add":
            if handle.done:  # cancelled before it was ever admitted
                return None
            # The other ranks add it too, and fail it the same way if it is bad.
            self._applied.append(("add", handle.prompt_ids, handle.params, handle.priority))
            try:
                handle.seq = self.engine.add_request(handle.prompt_ids, handle.params, handle.priority)
            except (RequestError, HeteroError, ValueError) as e:
                return handle, Delta(handle.tag, error=str(e), error_status=400)
            self._live[handle.seq.id] = handle
        elif handle.seq is not None:
            self._applied.append(("end", handle.seq.id, kind))
            self._live.pop(handle.seq.id, None)
            self.engine.abort(handle.seq, "stop" if kind == "stop" else "abort")
        return None

    def _step(self) -> list[tuple[Handle, Delta]]:
        try:
            outputs = self.engine.step()
        except Exception as e:  # a failed step must end every request, not leave clients hanging
            log.exception("engine step failed")
            return self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
        out = []
        for seq, tokens in outputs:
            handle = self._live.get(seq.id)
            if handle is None:
                continue
            logprobs = seq.logprobs[-len(tokens) :] if seq.params.logprobs is not None else []
            out.append((handle, Delta(handle.tag, list(tokens), logprobs, seq.finish_reason)))
            if seq.finished:
                del self._live[seq.id]
        return out

    def _fail_all(self, message: str) -> list[tuple[Handle, Delta]]:
        failed = list(self._live.values())
        self._live.clear()
        for handle in failed:
            self._applied.append(("end", handle.seq.id, "abort"))
            self.engine.abort(handle.seq)
        return [(h, Delta(h.tag, error=message)) for h in failed]

    def _deliver(self, out: list[tuple[Handle, Delta]]) -> None:
        try:
            self.loop.call_soon_threadsafe(_fan_out, out)
        except RuntimeError:  # the event loop is gone: the server is shutting down
            pass


def follow(engine: Engine, parallel: Parallel) -> None:
    """A rank other than 0 of a split server: apply rank 0's commands, run the same steps, until
    rank 0 stops. Sequence ids agree across ranks because every rank adds in the same order."""
    live: dict[int, Sequence] = {}
    while (commands := parallel.broadcast(None)) is not None:
        for cmd in commands:
            if cmd[0] == "add":
                try:
                    seq = engine.add_request(*cmd[1:])
                    live[seq.id] = seq
                except (RequestError, HeteroError, ValueError):
                    pass
            elif (seq := live.pop(cmd[1], None)) is not None:
                engine.abort(seq, "stop" if cmd[2] == "stop" else "abort")
        if engine.scheduler.has_work:
            try:
                done = [seq.id for seq, _ in engine.step() if seq.finished]
            except Exception:  # rank 0's step failed too: it ends every sequence, and says so
                log.exception("engine step failed")
                continue
            for i in done:
                live.pop(i, None)


def _fan_out(out: list[tuple[Handle, Delta]]) -> None:
    for handle, delta in out:
        if handle.done:  # cancelled from this side; whatever the engine still sent is moot
            continue
        if delta.finish_reason is not None or delta.error is not None:
            handle.done = True
        handle.queue.put_nowait(delta)
