"""Model handlers: the model-specific code the server runs, behind one small interface.

``WEIGHTCACHE_HANDLER=module:factory`` names a factory ``factory(model_dir, config, device) -> Handler``; the server
loads the weights itself (``server/loading.py``) and hands them over with ``load_state_dict``. A handler never
reads weight files on its own (that would bypass the checks and the fast path) and never touches HTTP.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from server.errors import HandlerError


@runtime_checkable
class Handler(Protocol):
    """What the server needs from a model. ``predict`` runs in a single worker thread, never concurrently."""

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Take the loaded tensors (already on the device; keep them, do not copy them)."""

    def warmup(self) -> None:
        """Run one real inference so the first request pays no lazy-initialisation cost."""

    def predict(self, inputs: list[list[float]]) -> list[list[float]]:
        """One batch in, one batch out; raise ``InvalidInputError`` for inputs this model cannot take."""

    def describe(self) -> dict[str, Any]:
        """A few facts for ``GET /v1/model`` (input size, parameter count…)."""


class HandlerFactory(Protocol):
    def __call__(self, model_dir: Path, config: dict[str, Any], device: torch.device) -> Handler: ...


def import_factory(spec: str) -> HandlerFactory:
    """Resolve ``module:attribute`` to a handler factory, with an error that says which half failed."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HandlerError(f"WEIGHTCACHE_HANDLER={spec!r}: expected module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HandlerError(f"WEIGHTCACHE_HANDLER={spec!r}: cannot import {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise HandlerError(f"WEIGHTCACHE_HANDLER={spec!r}: {module_name} has no callable {attr!r}")
    return factory  # type: ignore[no-any-return]
