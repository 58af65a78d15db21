"""The model's life in this process: wait for it → (fall back to fetching it) → load → warm up → serve.

``ModelService`` owns the cold start (one asyncio task), the handler, and the single inference thread. It knows
nothing about HTTP: the app asks it ``readiness()`` and ``predict()``. It is ready only after the weights are
loaded *and* a warm-up inference ran; it is never half-loaded: a failure leaves it failed, reports the error through
``on_fatal`` (the CLI exits non-zero so Kubernetes restarts the pod) and serves nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.config import ServerSettings
from server.errors import FallbackFetchError, HandlerError, ModelWaitTimeoutError, NotReadyError, StartupError
from server.handlers import Handler, import_factory
from server.loading import LoadedModel, load_model, prepare_device
from server.metrics import ServerMetrics
from server.waiting import resolve_model_path, wait_for_path

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


@dataclass
class Status:
    """What ``/readyz`` reports: a phase, a human reason, and how long each finished phase took."""

    phase: str = "starting"
    reason: str = "starting"
    model_path: str | None = None
    phases: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


class ModelService:
    """Runs the cold start and then serves predictions from one worker thread."""

    def __init__(
        self,
        settings: ServerSettings,
        metrics: ServerMetrics,
        *,
        import_seconds: float | None = None,
        on_fatal: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.status = Status()
        self.handler: Handler | None = None
        self.loaded: LoadedModel | None = None
        self._on_fatal = on_fatal
        # One thread for everything that touches the model: torch already parallelises inside an op, and a
        # single worker keeps predictions from competing with each other (and with warm-up) for the same cores.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task[None] | None = None
        self._started = time.perf_counter()
        self._root = settings.root  # the cache whose manifest checks the model: the fallback dir once we fetched
        if import_seconds is not None:
            self._record("import", import_seconds)

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Begin the cold start in the background (the HTTP server answers probes meanwhile)."""
        self._task = asyncio.get_running_loop().create_task(self._cold_start(), name="weightcache-cold-start")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _cold_start(self) -> None:
        # The device (a GPU's context) is made ready on the inference thread while we wait for the model; one
        # that cannot be used (cuda asked for, no GPU seen) fails the start at once, not when the model arrives.
        device = asyncio.get_running_loop().run_in_executor(self._executor, prepare_device, self.settings.device)
        waiting = asyncio.ensure_future(self._timed_wait())
        try:
            either: set[asyncio.Future[Any]] = {device, waiting}
            await asyncio.wait(either, return_when=asyncio.FIRST_EXCEPTION)
            if device.done() and device.exception() is not None:
                await device  # raises it
            path, found_at = await waiting
            # The load phase starts when the model is there: a device still getting ready is part of it.
            await self._load_and_warm(path, await device, since=found_at)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - anything here means we can never serve: fail loudly, once
            self._fail(e)
        finally:
            for future in (waiting, device):
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # retrieved: the first error is the one reported

    async def _timed_wait(self) -> tuple[Path, float]:
        started = time.perf_counter()
        path = await self._wait()
        found_at = time.perf_counter()
        self._record("wait", found_at - started)
        return path, found_at

    def _set(self, phase: str, reason: str) -> None:
        self.status.phase, self.status.reason = phase, reason
        log.info("%s: %s", phase, reason)

    def _record(self, phase: str, seconds: float) -> None:
        self.status.phases[phase] = round(seconds, 4)
        self.metrics.cold_start_seconds.labels(phase=phase).set(seconds)

    def _fail(self, error: BaseException) -> None:
        if not isinstance(error, StartupError):
            log.exception("unexpected error during cold start")
        message = f"{type(error).__name__}: {error}"
        self.status.phase, self.status.reason, self.status.error = "failed", message, message
        self.metrics.ready.set(0)
        log.error("cannot serve: %s", message)
        if self._on_fatal is not None:
            self._on_fatal(error)

    # ------------------------------------------------------------------------------------------- wait

    async def _wait(self) -> Path:
        s = self.settings
        if s.model_path:
            path = Path(s.model_path)
            self.status.model_path = str(path)
            self._set("waiting", f"waiting for model at {path}")
            await wait_for_path(path, timeout=s.wait_timeout_seconds, poll_interval=s.poll_interval_seconds)
            return path
        path = resolve_model_path(s.root, s.model)
        self.status.model_path = str(path)
        self._set("waiting", f"waiting for model {s.model} at {path}")
        if s.fallback != "fetch":
            await wait_for_path(path, timeout=s.wait_timeout_seconds, poll_interval=s.poll_interval_seconds)
            return path
        grace = min(s.fallback_grace_seconds, s.wait_timeout_seconds)
        try:
            await wait_for_path(path, timeout=grace, poll_interval=s.poll_interval_seconds)
            return path
        except ModelWaitTimeoutError:
            pass
        return await self._race_agent_and_fetch(path, s.wait_timeout_seconds - grace)

    async def _race_agent_and_fetch(self, path: Path, remaining: float) -> Path:
        """Fetch the model ourselves, but take the node agent's copy if it is published first."""
        s = self.settings
        self._set(
            "fetching",
            f"no agent published {s.model} within {s.fallback_grace_seconds:g} s: fetching it into {s.fallback_dir}",
        )
        agent_copy = asyncio.create_task(
            wait_for_path(path, timeout=remaining, poll_interval=s.poll_interval_seconds), name="wait-for-agent"
        )
        own_copy = asyncio.create_task(self._fetch(), name="fallback-fetch")
        pending: set[asyncio.Task[Any]] = {agent_copy, own_copy}
        errors: list[BaseException] = []
        try:
            async with asyncio.timeout(remaining):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for task in done:
                        error = task.exception()
                        if error is None:
                            if task is own_copy:
                                self.status.model_path = str(task.result())
                                self._root = s.fallback_dir
                                return Path(task.result())
                            return path
                        errors.append(error)
        except TimeoutError as e:
            raise ModelWaitTimeoutError(
                f"model {s.model} was neither published by the agent nor fetched within "
                f"{s.wait_timeout_seconds:g} s"
            ) from e
        finally:
            for task in pending:
                task.cancel()
        fetch_error = next((e for e in errors if isinstance(e, FallbackFetchError)), errors[-1])
        raise fetch_error

    async def _fetch(self) -> Path:
        """``weightcache-agent prefetch`` in a child process: the agent's fetch path, without the server importing
        the agent (only its cache layout); its threads and buffers never share the server's process."""
        s = self.settings
        argv = [sys.executable, "-m", "agent", "prefetch", "--cache-dir", str(s.fallback_dir), s.model]
        try:
            proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                        stderr=asyncio.subprocess.PIPE)
        except OSError as e:
            raise FallbackFetchError(f"WEIGHTCACHE_FALLBACK=fetch could not start the agent: {e}") from e
        try:
            out, err = await proc.communicate()
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        lines = out.decode(errors="replace").split("\n")
        if proc.returncode != 0 or not lines[0].strip():
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            raise FallbackFetchError(f"fallback fetch of {s.model} into {s.fallback_dir} failed "
                                     f"(exit {proc.returncode}): {' / '.join(tail) or 'no output'}")
        path = Path(lines[0].strip())
        log.info("fetched %s ourselves into %s", s.model, path)
        return path

    # ------------------------------------------------------------------------------------------- load

    async def _load_and_warm(self, path: Path, device: torch.device, *, since: float) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        root = self._root
        self._set("loading", f"loading weights from {path}")
        started = since
        loaded = await loop.run_in_executor(
            self._executor,
            lambda: load_model(path, root=root, device=device, strategy=s.load_strategy, verify=s.verify),
        )
        handler = await loop.run_in_executor(self._executor, self._build_handler, loaded)
        self._record("load", time.perf_counter() - started)
        self.metrics.model_bytes.set(loaded.files.total_bytes)

        self._set("warming", "running the warm-up inference")
        started = time.perf_counter()
        try:
            await loop.run_in_executor(self._executor, handler.warmup)
        except StartupError:
            raise
        except Exception as e:
            raise HandlerError(f"warm-up inference failed: {e}") from e
        self._record("warmup", time.perf_counter() - started)

        self.loaded, self.handler = loaded, handler
        self._record("total", time.perf_counter() - self._started + self.status.phases.get("import", 0.0))
        self.metrics.ready.set(1)
        self._set("ready", "model loaded and warmed up")
        log.info("cold start done: %s", ", ".join(f"{k} {v:.2f} s" for k, v in self.status.phases.items()))

    def _build_handler(self, loaded: LoadedModel) -> Handler:
        factory = import_factory(self.settings.handler)
        try:
            handler = factory(loaded.files.model_dir, loaded.files.config, loaded.device)
            handler.load_state_dict(loaded.state_dict)
        except StartupError:
            raise
        except Exception as e:
            raise HandlerError(f"handler {self.settings.handler} could not take the weights: {e}") from e
        return handler

    # ------------------------------------------------------------------------------------------- serve

    def readiness(self) -> Status:
        return self.status

    async def predict(self, inputs: list[list[float]]) -> list[list[float]]:
        handler = self.handler
        if handler is None or not self.status.ready:
            raise NotReadyError(f"model not ready: {self.status.reason}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, handler.predict, inputs)
