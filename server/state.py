"""What the server keeps between requests: its settings, the loaded model and its worker, and the
OpenAI-shaped error every failure becomes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from hetero.runtime import Runtime
from server.metrics import Metrics
from server.worker import EngineWorker

log = logging.getLogger("hetero.server")


@dataclass
class ServerConfig:
    model_name: str | None = None  # what clients pass as "model"; default: the checkpoint folder's name
    api_key: str | None = None  # None: no authentication
    max_queue: int = 256  # sequences waiting beyond the running batch before 429
    default_max_tokens: int | None = None  # when a request names none; None: the rest of the context

    def __post_init__(self) -> None:
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.default_max_tokens is not None and self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")


class APIError(Exception):
    """An error returned to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


@dataclass
class ServerState:
    config: ServerConfig
    metrics: Metrics = field(default_factory=Metrics)
    runtime: Runtime | None = None
    worker: EngineWorker | None = None
    model_name: str = ""
    load_error: str | None = None
    on_load_error: Callable[[], None] | None = None
    in_flight: int = 0  # sequences accepted and not yet finished
    _detach: Callable[[], None] | None = None

    def attach(self, runtime: Runtime, loop: asyncio.AbstractEventLoop) -> None:
        self.model_name = self.config.model_name or runtime.path.name
        worker = EngineWorker(runtime.engine, loop, runtime.parallel)
        self._detach = self.metrics.attach(runtime.engine, lambda: worker.num_pending)
        if runtime.plan is not None:
            self.metrics.show_plan(runtime.plan.predicted, runtime.engine.config.max_batch)
        worker.start()
        self.runtime, self.worker = runtime, worker
        log.info("model %s ready", self.model_name)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self._detach is not None:
            self._detach()

    def ready(self) -> tuple[Runtime, EngineWorker]:
        if self.runtime is None or self.worker is None:
            why = (
                f"the model failed to load: {self.load_error}" if self.load_error else "the model is loading"
            )
            raise APIError(503, f"{why}; retry shortly", type="service_unavailable", code="model_not_ready")
        return self.runtime, self.worker

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                param="model",
                code="model_not_found",
            )
