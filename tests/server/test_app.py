"""server/app.py + server/lifecycle.py in-process (TestClient): probes, readiness, predictions, errors → status."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from server.app import create_app
from server.config import ServerSettings
from server.errors import HandlerError
from tests.server.conftest import TINY, CacheRoot


def _client(**settings: Any) -> tuple[TestClient, list[BaseException]]:
    fatal: list[BaseException] = []
    values: dict[str, Any] = {"device": "cpu", "poll_interval_seconds": 0.1, **settings}
    app = create_app(ServerSettings(**values), on_fatal=fatal.append)
    return TestClient(app), fatal


def _wait_phase(client: TestClient, phase: str, timeout: float = 15) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        response: httpx.Response = client.get("/readyz")
        if response.json()["phase"] == phase or time.monotonic() > deadline:
            return response
        time.sleep(0.02)


@pytest.fixture
def ready_client(tiny_model: Path) -> Iterator[TestClient]:
    client, fatal = _client(model_path=str(tiny_model), max_batch=4, max_body_bytes=2000)
    with client:
        assert _wait_phase(client, "ready").status_code == 200, fatal
        yield client


def test_probes_answer_while_waiting_and_ready_only_after_the_model_appears(cache_root: CacheRoot) -> None:
    client, fatal = _client(model="s3://bucket/late/", root=cache_root.root)
    with client:
        waiting = _wait_phase(client, "waiting")
        assert client.get("/healthz").status_code == 200
        assert waiting.status_code == 503
        assert "waiting for model" in waiting.json()["reason"]
        assert str(cache_root.root / "models/s3/bucket/late") in waiting.json()["reason"]
        cache_root.stage("late")
        cache_root.publish("s3://bucket/late/", "late")
        ready = _wait_phase(client, "ready")
        assert ready.status_code == 200, ready.json()
        assert set(ready.json()["cold_start_seconds"]) >= {"wait", "load", "warmup"}
    assert fatal == []


def test_prediction_returns_one_output_row_per_input_row(ready_client: TestClient) -> None:
    response = ready_client.post("/v1/predict", json={"inputs": [[0.5] * TINY.input_dim, [1.0] * TINY.input_dim]})
    assert response.status_code == 200
    outputs = response.json()["outputs"]
    assert [len(row) for row in outputs] == [TINY.output_dim, TINY.output_dim]


def test_row_of_the_wrong_width_is_a_422_naming_the_expected_width(ready_client: TestClient) -> None:
    response = ready_client.post("/v1/predict", json={"inputs": [[0.0] * TINY.input_dim, [1.0, 2.0]]})
    assert response.status_code == 422
    assert response.json() == {
        "error": "InvalidInput", "detail": f"inputs[1] has 2 values; this model takes {TINY.input_dim} per row",
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"not json", "json_invalid"),
        (b'{"inputs": []}', "too_short"),
        (b'{"inputs": [[1, "x"]]}', "float_parsing"),
        (b'{"inputs": [[1]], "extra": 1}', "extra_forbidden"),
        (b'{"inputs": [[NaN]]}', "finite_number"),
        (b'{}', "missing"),
    ],
)
def test_malformed_bodies_are_422_with_the_pydantic_reason(ready_client: TestClient, body: bytes, expected: str) -> None:
    response = ready_client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["error"] == "InvalidInput"
    assert expected in {e["type"] for e in response.json()["detail"]}


def test_batch_larger_than_the_limit_is_a_422(ready_client: TestClient) -> None:
    response = ready_client.post("/v1/predict", json={"inputs": [[0.0] * TINY.input_dim] * 5})
    assert response.status_code == 422
    assert "WEIGHTCACHE_MAX_BATCH=4" in response.json()["detail"]


def test_body_larger_than_the_limit_is_a_413(ready_client: TestClient) -> None:
    response = ready_client.post("/v1/predict", content=b"[" * 3000, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"] == "PayloadTooLarge"


def test_streamed_body_without_length_is_cut_off_at_the_limit(ready_client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    response = ready_client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_prediction_before_ready_is_a_503_with_retry_after(tmp_path: Path) -> None:
    client, _ = _client(model_path=str(tmp_path / "absent"))
    with client:
        response = client.post("/v1/predict", json={"inputs": [[0.0]]})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        assert "waiting for model" in response.json()["detail"]


def test_metrics_export_cold_start_phases_latency_and_readiness(ready_client: TestClient) -> None:
    ready_client.post("/v1/predict", json={"inputs": [[0.0] * TINY.input_dim]})
    text = ready_client.get("/metrics").text
    for phase in ("wait", "load", "warmup"):
        assert f'weightcache_server_cold_start_seconds{{phase="{phase}"}}' in text
    assert 'weightcache_server_request_duration_seconds_count{route="/v1/predict",status="200"} 1.0' in text
    assert "weightcache_server_ready 1.0" in text
    assert "weightcache_server_requests_in_flight" in text


def test_model_info_and_openapi_docs_describe_the_predict_endpoint(ready_client: TestClient) -> None:
    info = ready_client.get("/v1/model").json()
    assert info["input_dim"] == TINY.input_dim and info["load_strategy"] == "mmap"
    assert ready_client.get("/docs").status_code == 200
    schema = ready_client.get("/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "inputs" in body["properties"]


def test_corrupt_shard_fails_the_cold_start_and_never_becomes_ready(tiny_model: Path) -> None:
    shard = min(tiny_model.glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-10])
    client, fatal = _client(model_path=str(tiny_model))
    with client:
        failed = _wait_phase(client, "failed")
        assert failed.status_code == 503
        assert "CorruptModelError" in failed.json()["reason"]
        assert client.post("/v1/predict", json={"inputs": [[0.0]]}).status_code == 503
    assert len(fatal) == 1


class EchoHandler:
    """A user handler: returns each row's sum; proves WEIGHTCACHE_HANDLER=module:factory is honoured."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.names: list[str] = []

    def load_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        self.names = sorted(state_dict)

    def warmup(self) -> None:
        pass

    def predict(self, inputs: list[list[float]]) -> list[list[float]]:
        return [[sum(row)] for row in inputs]

    def describe(self) -> dict[str, Any]:
        return {"tensors": len(self.names)}


def make_echo_handler(model_dir: Path, config: dict[str, Any], device: torch.device) -> EchoHandler:
    return EchoHandler(config)


def fail_warmup_handler(model_dir: Path, config: dict[str, Any], device: torch.device) -> EchoHandler:
    handler = EchoHandler(config)
    handler.warmup = lambda: (_ for _ in ()).throw(RuntimeError("kernel exploded"))  # type: ignore[method-assign]
    return handler


def test_custom_handler_factory_serves_predictions(tiny_model: Path) -> None:
    client, _ = _client(model_path=str(tiny_model), handler="tests.server.test_app:make_echo_handler")
    with client:
        assert _wait_phase(client, "ready").status_code == 200
        assert client.post("/v1/predict", json={"inputs": [[1, 2, 3]]}).json() == {"outputs": [[6.0]]}


def test_handler_whose_warmup_fails_never_becomes_ready(tiny_model: Path) -> None:
    client, fatal = _client(model_path=str(tiny_model), handler="tests.server.test_app:fail_warmup_handler")
    with client:
        failed = _wait_phase(client, "failed")
        assert "warm-up inference failed: kernel exploded" in failed.json()["reason"]
    assert isinstance(fatal[0], HandlerError)


def test_unimportable_handler_is_a_startup_failure(tiny_model: Path) -> None:
    client, fatal = _client(model_path=str(tiny_model), handler="no.such.module:factory")
    with client:
        failed = _wait_phase(client, "failed")
        assert "cannot import 'no.such.module'" in failed.json()["reason"]
    assert isinstance(fatal[0], HandlerError)
