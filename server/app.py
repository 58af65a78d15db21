"""The HTTP face of the server (FastAPI): probes, metrics, docs and ``POST /v1/predict``.

Thin on purpose: the cold start and the model live in ``server/lifecycle.py``. Every error becomes an HTTP
response in one place (the exception handlers below, with ``server.errors.status_for``). The event loop never runs
model code: predictions go to the service's inference thread, so ``/healthz`` and ``/readyz`` answer while a
model loads or a long batch runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server import __version__
from server.config import ServerSettings
from server.errors import InvalidInputError, NotReadyError, PayloadTooLargeError, ServerError, status_for
from server.lifecycle import ModelService
from server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class PredictRequest(BaseModel):
    """A batch of rows; each row holds the model's ``input_dim`` numbers (see ``GET /v1/model``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    inputs: list[list[float]] = Field(min_length=1, examples=[[[0.0] * 4]], description="rows × input_dim numbers")


class PredictResponse(BaseModel):
    outputs: list[list[float]] = Field(description="one row of output_dim numbers per input row")


class ErrorBody(BaseModel):
    error: str
    detail: Any


def create_app(
    settings: ServerSettings,
    *,
    import_seconds: float | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """Build the app; its lifespan starts the cold start in the background and stops it on shutdown."""
    metrics = ServerMetrics()
    service = ModelService(settings, metrics, import_seconds=import_seconds, on_fatal=on_fatal)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="weightcache inference server",
        version=__version__,
        description="Serves a model from the weightcache node cache. Ready only once weights are loaded and "
        "a warm-up inference ran.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.metrics = metrics
    _install_error_handlers(app)
    _install_metrics_middleware(app, metrics)

    @app.get("/healthz", tags=["probes"], summary="Liveness: the process is alive and serving HTTP")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["probes"],
        summary="Readiness: 200 once the weights are loaded and warmed up, else 503 with the reason",
        responses={503: {"description": "not ready yet (waiting, fetching, loading, warming, failed)"}},
    )
    async def readyz() -> JSONResponse:
        status = service.readiness()
        body = {
            "ready": status.ready,
            "phase": status.phase,
            "reason": status.reason,
            "model_path": status.model_path,
            "cold_start_seconds": status.phases,
        }
        return JSONResponse(body, status_code=200 if status.ready else 503)

    @app.get("/metrics", tags=["probes"], summary="Prometheus metrics")
    async def metrics_endpoint() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", tags=["model"], summary="What is being served", responses={503: {"model": ErrorBody}})
    async def model_info() -> dict[str, Any]:
        if service.handler is None or service.loaded is None:
            raise NotReadyError(f"model not ready: {service.status.reason}")
        return {
            "model_path": service.status.model_path,
            "device": str(service.loaded.device),
            "bytes": service.loaded.files.total_bytes,
            "files": len(service.loaded.files.weights),
            "load_strategy": service.loaded.strategy,
            "verified": service.loaded.verified,
            **service.handler.describe(),
        }

    @app.post(
        "/v1/predict",
        tags=["model"],
        summary="Run the model on a batch",
        response_model=PredictResponse,
        # The body is read by hand (to enforce the size limit while streaming), so document it explicitly.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": PredictRequest.model_json_schema()}},
            }
        },
        responses={
            413: {"model": ErrorBody, "description": "body larger than WEIGHTCACHE_MAX_BODY_BYTES"},
            422: {"model": ErrorBody, "description": "not a valid batch for this model"},
            503: {"model": ErrorBody, "description": "model not ready yet"},
        },
    )
    async def predict(request: Request) -> PredictResponse:
        if not service.status.ready:
            raise NotReadyError(f"model not ready: {service.status.reason}")
        body = await _read_limited(request, settings.max_body_bytes)
        parsed = PredictRequest.model_validate_json(body)
        if len(parsed.inputs) > settings.max_batch:
            raise InvalidInputError(
                f"batch of {len(parsed.inputs)} rows is larger than WEIGHTCACHE_MAX_BATCH={settings.max_batch}"
            )
        return PredictResponse(outputs=await service.predict(parsed.inputs))

    return app


async def _read_limited(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed ``limit`` — never buffering more."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(f"request body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _install_error_handlers(app: FastAPI) -> None:
    """The one place where exceptions become HTTP responses."""

    async def server_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServerError)
        status = status_for(exc)
        headers = {"Retry-After": "5"} if status == 503 else None
        return JSONResponse({"error": exc.reason, "detail": str(exc)}, status_code=status, headers=headers)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ValidationError | RequestValidationError)
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()[:20]  # a 10 MB body of bad numbers must not produce a 10 MB error
        ]
        return JSONResponse({"error": "InvalidInput", "detail": errors}, status_code=422)

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error while serving a request", exc_info=exc)
        return JSONResponse({"error": "InternalError", "detail": "internal error (see server log)"}, status_code=500)

    app.add_exception_handler(ServerError, server_error)
    app.add_exception_handler(ValidationError, validation_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


def _install_metrics_middleware(app: FastAPI, metrics: ServerMetrics) -> None:
    @app.middleware("http")
    async def observe(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        metrics.in_flight.inc()
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            metrics.in_flight.dec()
            route = request.scope.get("route")
            # The route template, never the raw path: unknown paths must not create unbounded label values.
            label = getattr(route, "path", "unmatched")
            metrics.request_duration_seconds.labels(route=label, status=str(status)).observe(
                time.perf_counter() - started
            )
