"""The built-in demo handler: serves the MLP that ``python -m server.demo_model`` writes.

Its shape comes from ``config.json`` (when present) and must agree with the weights; the module is built on the
``meta`` device and the loaded tensors are *assigned* into it, so serving adds no copy of the weights. It never
reads files itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from server.demo_model import DemoShape, tensor_shapes
from server.errors import HandlerError, InvalidInputError


class DemoMLP(nn.Module):
    """input → tanh(Linear) × num_layers → output. tanh keeps float16 activations finite whatever the weights."""

    def __init__(self, shape: DemoShape) -> None:
        super().__init__()
        self.input = nn.Linear(shape.input_dim, shape.hidden_size)
        self.layers = nn.ModuleList(nn.Linear(shape.hidden_size, shape.hidden_size) for _ in range(shape.num_layers))
        self.output = nn.Linear(shape.hidden_size, shape.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.input(x))
        for layer in self.layers:
            x = torch.tanh(layer(x))
        out: torch.Tensor = self.output(x)
        return out


def _shape_from_state(state: Mapping[str, torch.Tensor]) -> DemoShape:
    try:
        hidden, input_dim = state["input.weight"].shape
        output_dim = state["output.weight"].shape[0]
    except (KeyError, ValueError) as e:
        raise HandlerError(f"these weights are not a demo model (missing or odd {e}); wrong WEIGHTCACHE_HANDLER?") from e
    layers = sum(1 for name in state if name.startswith("layers.") and name.endswith(".weight"))
    dtype = str(state["input.weight"].dtype).removeprefix("torch.")
    return DemoShape(int(input_dim), int(hidden), layers, int(output_dim), dtype)


class DemoHandler:
    """Serves ``DemoMLP``; ``predict`` takes a batch of ``input_dim`` floats per row."""

    def __init__(self, model_dir: Path, config: dict[str, Any], device: torch.device) -> None:
        self.model_dir = model_dir
        self.config = config
        self.device = device
        self.shape: DemoShape | None = None
        self.model: DemoMLP | None = None

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        shape = _shape_from_state(state_dict)
        if self.config:
            keys = ("input_dim", "hidden_size", "num_layers", "output_dim")
            declared = {k: self.config.get(k) for k in keys}
            actual = {k: getattr(shape, k) for k in keys}
            if declared != actual:
                raise HandlerError(f"config.json says {declared} but the weights are {actual}")
        expected = set(tensor_shapes(shape))
        if set(state_dict) != expected:
            odd = sorted(set(state_dict) ^ expected)[:5]
            raise HandlerError(f"weights do not match the demo model's tensors (e.g. {odd})")
        with torch.device("meta"):
            model = DemoMLP(shape)
        # assign=True: the module's parameters become the loaded tensors themselves (mmap views / device buffers).
        try:
            model.load_state_dict(dict(state_dict), strict=True, assign=True)
        except RuntimeError as e:
            raise HandlerError(f"weights do not fit the demo model: {e}") from e
        self.model = model.eval().requires_grad_(False)
        self.shape = shape

    def _run(self, batch: torch.Tensor) -> torch.Tensor:
        if self.model is None or self.shape is None:
            raise HandlerError("predict called before load_state_dict")
        with torch.inference_mode():
            out: torch.Tensor = self.model(batch.to(self.device, self.model.input.weight.dtype))
            return out.float().cpu()

    def warmup(self) -> None:
        # One row through every layer: touches every weight once and initialises the kernels.
        assert self.shape is not None
        out = self._run(torch.zeros(1, self.shape.input_dim))
        if not torch.isfinite(out).all():
            raise HandlerError("warm-up inference produced non-finite outputs: the weights are not usable")

    def predict(self, inputs: list[list[float]]) -> list[list[float]]:
        assert self.shape is not None
        for i, row in enumerate(inputs):
            if len(row) != self.shape.input_dim:
                raise InvalidInputError(
                    f"inputs[{i}] has {len(row)} values; this model takes {self.shape.input_dim} per row"
                )
        result: list[list[float]] = self._run(torch.tensor(inputs, dtype=torch.float32)).tolist()
        return result

    def describe(self) -> dict[str, Any]:
        assert self.shape is not None and self.model is not None
        return {
            "model_type": "weightcache-demo",
            "input_dim": self.shape.input_dim,
            "output_dim": self.shape.output_dim,
            "hidden_size": self.shape.hidden_size,
            "num_layers": self.shape.num_layers,
            "dtype": self.shape.torch_dtype,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def create_handler(model_dir: Path, config: dict[str, Any], device: torch.device) -> DemoHandler:
    """The factory named by the default ``WEIGHTCACHE_HANDLER``."""
    return DemoHandler(model_dir, config, device)
