"""Every kustomization renders, and every object it renders validates offline.

Built-in kinds go through `kubernetes-validate --strict` (unknown fields are errors) for the oldest and newest
Kubernetes we support. kubernetes-validate has no schemas for custom resources and only WARNs about them (exit
0), so the CRD kinds are validated separately against the strict schemas in tests/deploy/schemas/.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from .rendered import CRD_KINDS, ENTRY_POINTS, Obj, entry_id, render
from .tools import MANIFESTS, kustomize

KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # 1.30: ValidatingAdmissionPolicy is GA (v1)
SCHEMAS = Path(__file__).parent / "schemas"
_LINE = re.compile(r"^(INFO|WARN|ERROR|FATAL) ")


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=entry_id)
def test_kustomization_renders_to_objects(entry: Path) -> None:
    objects = render(entry)
    assert objects, f"{entry} rendered nothing"
    assert all({"apiVersion", "kind", "metadata"} <= obj.keys() for obj in objects)


def test_top_level_kustomization_renders_exactly_the_base() -> None:
    assert kustomize(MANIFESTS) == kustomize(MANIFESTS / "base")


def test_base_holds_no_custom_resources(base: list[Obj]) -> None:
    # `kubectl apply -k manifests/` must work on a cluster without prometheus-operator.
    assert not [o["kind"] for o in base if o["kind"] in CRD_KINDS]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=entry_id)
def test_every_builtin_object_passes_strict_schema_validation(
    entry: Path, version: str, renders: dict[Path, list[Obj]], tmp_path: Path
) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(yaml.safe_dump_all(renders[entry]))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(rendered)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    lines = [line for line in result.stdout.splitlines() if _LINE.match(line)]
    assert result.returncode == 0, result.stdout + result.stderr
    assert not [line for line in lines if line.startswith(("ERROR", "FATAL"))], result.stdout
    # A WARN means "no schema, not validated": acceptable only for the CRD kinds, checked in the next test.
    unvalidated = [line for line in lines if line.startswith("WARN")]
    assert all(any(f"kind {kind} " in line for kind in CRD_KINDS) for line in unvalidated), unvalidated
    passed = [line for line in lines if line.startswith("INFO") and " passed " in line]
    builtin = [o for o in renders[entry] if o["kind"] not in CRD_KINDS]
    assert len(passed) == len(builtin), result.stdout


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=entry_id)
def test_every_custom_resource_matches_its_vendored_schema(entry: Path, renders: dict[Path, list[Obj]]) -> None:
    for obj in renders[entry]:
        if obj["kind"] in CRD_KINDS:
            schema = json.loads((SCHEMAS / f"{obj['kind'].lower()}.json").read_text())
            jsonschema.Draft202012Validator(schema).validate(obj)


def test_vendored_schemas_reject_a_misspelt_field(monitoring: list[Obj]) -> None:
    # The point of the schemas is strictness: a typo the operator would silently ignore must fail here.
    monitor = next(o for o in monitoring if o["kind"] == "PodMonitor")
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["podMetricEndpoints"] = broken["spec"].pop("podMetricsEndpoints")
    schema = json.loads((SCHEMAS / "podmonitor.json").read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(schema).validate(broken)


def test_every_entry_point_is_covered() -> None:
    # A new overlay directory is picked up by the tests above without being listed anywhere.
    overlays = {p.name for p in (MANIFESTS / "overlays").iterdir() if (p / "kustomization.yaml").exists()}
    assert {entry_id(p).removeprefix("overlays/") for p in ENTRY_POINTS[1:]} == overlays
    assert {"eks", "monitoring"} <= overlays
