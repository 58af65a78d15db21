"""``agent.cluster.policy``: who may use which models and what each node warms — parsed strictly, decided on whole
path segments; and the daemon's ``PolicyHolder``, which re-reads the file and keeps the last good policy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.cluster.policy import DEFAULT_WARM_DEADLINE_SECONDS, load_policy, parse_policy
from agent.daemon.run import PolicyHolder
from agent.errors import ConfigError
from agent.uris import parse_model_uri

EXAMPLE = """\
allow:
  - s3://shared-models/
namespaces:
  team-a: [s3://team-a-models/]
warm:
  - nodeSelector: {node.kubernetes.io/instance-type: p5.48xlarge}
    models: [s3://shared-models/llama-3-8b/]
  - nodeSelector: {node.kubernetes.io/instance-type: p5.48xlarge, zone: b}
    models: [s3://shared-models/llama-3-70b/, s3://shared-models/llama-3-8b/]
warmDeadlineSeconds: 120
"""


def allows(text: str, namespace: str, uri: str) -> bool:
    return parse_policy(text).allows(namespace, parse_model_uri(uri))


def test_no_policy_file_allows_everything() -> None:
    policy = load_policy(None)
    assert policy.open and policy.allows("any", parse_model_uri("s3://whatever/m/"))
    assert policy.warm_models({"a": "b"}) == []


def test_the_shared_allow_list_applies_to_every_namespace() -> None:
    assert allows(EXAMPLE, "team-z", "s3://shared-models/llama-3-8b/")
    assert not allows(EXAMPLE, "team-z", "s3://team-a-models/m/")


def test_namespace_prefixes_apply_only_to_their_namespace() -> None:
    assert allows(EXAMPLE, "team-a", "s3://team-a-models/m/weights.bin")
    assert not allows(EXAMPLE, "team-b", "s3://team-a-models/m/weights.bin")


def test_a_prefix_matches_whole_path_segments_only() -> None:
    text = "allow: [s3://team-a, s3://shared/models/]\n"
    assert allows(text, "ns", "s3://team-a/m/")
    assert not allows(text, "ns", "s3://team-a-evil/m/")
    assert allows(text, "ns", "s3://shared/models/x.bin")
    assert not allows(text, "ns", "s3://shared/models-private/x.bin")


def test_an_empty_policy_file_allows_nothing() -> None:
    policy = parse_policy("")
    assert not policy.open
    assert not policy.allows("default", parse_model_uri("s3://shared-models/m/"))


def test_the_warm_set_is_chosen_by_node_labels_without_duplicates() -> None:
    policy = parse_policy(EXAMPLE)
    big = {"node.kubernetes.io/instance-type": "p5.48xlarge", "zone": "b"}
    assert [m.uri for m in policy.warm_models(big)] == ["s3://shared-models/llama-3-8b/",
                                                        "s3://shared-models/llama-3-70b/"]
    assert [m.uri for m in policy.warm_models({"node.kubernetes.io/instance-type": "p5.48xlarge"})] == [
        "s3://shared-models/llama-3-8b/"]
    assert policy.warm_models({"node.kubernetes.io/instance-type": "g5.xlarge"}) == []
    assert policy.warm_deadline_seconds == 120


def test_the_warm_deadline_has_a_default() -> None:
    assert parse_policy("allow: []\n").warm_deadline_seconds == DEFAULT_WARM_DEADLINE_SECONDS


@pytest.mark.parametrize(("text", "complaint"), [
    ("allow: [s3://a/\n", "not valid YAML"),
    ("- s3://a/\n", "must be a mapping"),
    ("allwo: [s3://a/]\n", "unknown keys ['allwo']"),
    ("allow: s3://a/\n", "allow must be a list"),
    ("allow: [https://a/]\n", "is not an s3:// URI prefix"),
    ("namespaces: [a, b]\n", "namespaces must map"),
    ("namespaces: {team: [gs://x/]}\n", "namespaces.team"),
    ("warm: [s3://a/]\n", "warm[0] must be a mapping"),
    ("warm: [{nodeSelector: [a], models: []}]\n", "nodeSelector must be a mapping"),
    ("warm: [{models: s3://a/m/}]\n", "models must be a list"),
    ("warm: [{models: ['s3://a/../m/']}]\n", "warm[0]"),
    ("warmDeadlineSeconds: soon\n", "warmDeadlineSeconds must be a number"),
])
def test_an_invalid_policy_is_refused_saying_what_is_wrong(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_policy(text, source="policy.yaml")
    assert complaint in str(e.value) and "policy.yaml" in str(e.value)


def test_an_unreadable_policy_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read policy file"):
        load_policy(tmp_path / "absent.yaml")


# ----- re-reading the file (the daemon's PolicyHolder) ---------------------------------------------------------


def _replace(path: Path, text: str) -> None:
    staged = path.with_suffix(".new")
    staged.write_text(text)
    os.replace(staged, path)


def test_a_changed_policy_file_is_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("allow: [s3://a/]\n")
    holder = PolicyHolder(path)
    assert holder.reload_if_changed() is False, "unchanged content is not a reload"

    _replace(path, "allow: [s3://b/]\n")
    assert holder.reload_if_changed() is True
    assert holder.policy.allow == ("s3://b/",)


def test_a_broken_edit_keeps_the_previous_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("allow: [s3://a/]\n")
    holder = PolicyHolder(path)

    _replace(path, "allow: [s3://b/\n")  # a typo
    assert holder.reload_if_changed() is False
    assert holder.policy.allow == ("s3://a/",)
    _replace(path, "allow: [s3://c/]\n")  # fixed
    assert holder.reload_if_changed() is True and holder.policy.allow == ("s3://c/",)


def test_a_policy_file_that_vanishes_keeps_the_previous_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("allow: [s3://a/]\n")
    holder = PolicyHolder(path)
    path.unlink()
    assert holder.reload_if_changed() is False
    assert holder.policy.allow == ("s3://a/",)


def test_an_invalid_policy_file_at_start_up_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("allow: nope\n")
    with pytest.raises(ConfigError):
        PolicyHolder(path)
