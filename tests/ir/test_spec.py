import copy

import pytest
import yaml

from trainplan.errors import SpecError
from trainplan.ir.loading import dump_yaml, load, validate
from trainplan.ir.spec import Spec

BASE = {
    "name": "gpt3-175b-a100",
    "model": {"catalogue": "gpt", "args": {"layers": 96, "hidden": 12288, "heads": 96, "vocab": 51200, "seq_len": 2048}},
    "task": {"kind": "lm", "vocab": 51200, "seq_len": 2048},
    "training": {"global_batch": 1536, "precision": "bf16", "optimizer": "adam", "lr": 6.0e-5, "steps": 100, "seed": 0},
    "cluster": {"preset": "a100-80g", "nodes": 128},
    "parallel": {"tp": 8, "recompute": "full"},
}


def with_change(path: str, value):
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return data


def error_of(data) -> SpecError:
    with pytest.raises(SpecError) as info:
        validate(Spec, data, "spec.yaml")
    return info.value


def test_issue_example_parses_with_defaults():
    spec = validate(Spec, BASE)
    assert spec.parallel.tp == 8 and spec.parallel.pp == "auto" and spec.parallel.recompute == "full"
    assert spec.cluster.world_size == 1024
    assert spec.objective == "throughput"
    assert spec.parallel.fixed() == {"tp": 8, "recompute": "full"}


def test_yaml_and_json_round_trip():
    spec = validate(Spec, BASE)
    again = validate(Spec, yaml.safe_load(dump_yaml(spec)))
    assert again == spec
    assert Spec.model_validate_json(spec.model_dump_json(by_alias=True)) == spec
    assert dump_yaml(again) == dump_yaml(spec)


def test_every_example_plan_loads(repo):
    for path in sorted((repo / "plans").glob("*.yaml")):
        load(Spec, path)


@pytest.mark.parametrize(
    "path, value, where, message",
    [
        ("parallel.tp", -2, "parallel.tp", "expected 'auto' or a positive integer, got -2"),
        ("parallel.tp", "8", "parallel.tp", "expected 'auto' or a positive integer, got '8'"),
        ("parallel.schedule", "1F1B", "parallel.schedule", "'gpipe', '1f1b', 'interleaved'"),
        ("parallel.zero", 4, "parallel.zero", "one of 0, 1, 2, 3"),
        ("parallel.sequence_parallel", "yes", "parallel.sequence_parallel", "true or false"),
        ("training.precision", "fp8", "training.precision", "'fp32', 'bf16' or 'fp16'"),
        ("training.global_batch", 0, "training.global_batch", "greater than 0"),
        ("cluster.preset", "a200", "cluster", "unknown preset 'a200'"),
        ("cluster.device", {"memory": "lots"}, "cluster.device.memory", "got 'lots'"),
        ("model.import", "no_colon", "model.import", "expected 'package.module:function', got 'no_colon'"),
        ("task.classes", 10, "task", "'classes' does not apply to task kind 'lm'"),
    ],
)
def test_errors_name_the_yaml_path(path, value, where, message):
    err = error_of(with_change(path, value))
    paths = [p for p, _ in err.problems]
    assert where in paths, err
    assert message in str(err)
    assert str(err).startswith("spec.yaml")


def test_unknown_key_suggests_the_close_one():
    err = error_of(with_change("parallel.tpp", 2))
    assert "unknown key 'tpp'" in str(err) and "did you mean 'tp'" in str(err)


def test_unknown_top_level_key():
    err = error_of(with_change("trainig", {}))
    assert "did you mean 'training'" in str(err)


def test_missing_required_field():
    data = copy.deepcopy(BASE)
    del data["training"]["global_batch"]
    assert ("training.global_batch", "required field is missing") in error_of(data).problems


def test_exactly_one_model_source():
    err = error_of(with_change("model", {"catalogue": "gpt", "hf": {"arch": "gpt2"}}))
    assert "got catalogue, hf" in str(err)
    err = error_of(with_change("model", {"args": {}}))
    assert "got none" in str(err)


def test_not_a_mapping():
    assert "expected a mapping" in str(error_of([1, 2]))
    assert "an empty file" in str(error_of(None))


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(SpecError, match=r"bad.yaml: invalid YAML at line \d+"):
        load(Spec, path)
    with pytest.raises(SpecError, match="no such file"):
        load(Spec, tmp_path / "missing.yaml")


def test_unknown_keys_that_look_like_pydantic_markers_are_reported():
    # found by the fuzzer: pydantic's union-branch names ('literal[...', 'int') must not swallow a user's key
    for key in ("literal[", "int", "function-after"):
        err = error_of(with_change(f"parallel.{key}", 1))
        assert f"unknown key {key!r}" in str(err), err


@pytest.mark.parametrize(
    "path, value, message",
    [
        ("cluster.device", {"peak_flops": {"bf16": 0, "fp32": 0}}, "positive rate"),
        ("cluster.device", {"memory": 0}, "must exceed memory_reserved"),
        ("cluster.device", {"memory_bandwidth": 0}, "memory_bandwidth must be positive"),
        ("cluster.device", {"memory": "1e400 GiB"}, "finite number"),
        ("name", "../../etc", "usable as a folder name"),
    ],
)
def test_unphysical_clusters_and_unsafe_names_are_refused(path, value, message):
    # found in review: these used to pass validation and crash (or misbehave) at plan time
    data = with_change(path, value) if path == "name" else with_change("cluster", {"preset": "a100-80g", "nodes": 128, "device": value})
    assert message in str(error_of(data)).lower() or message in str(error_of(data))


def test_a_device_without_a_rate_for_the_precision_is_refused():
    err = error_of(with_change("cluster", {"preset": "v100-32g", "nodes": 128}))  # Volta has no bf16
    assert "no rate for training.precision 'bf16'" in str(err)


def test_bare_numbers_in_strings_are_base_units():
    # YAML 1.1 reads 25e9 (no dot) as a string
    from trainplan.ir.units import parse_bandwidth, parse_flops, parse_seconds

    assert parse_bandwidth("25e9") == 25e9 and parse_flops("312e12") == 312e12 and parse_seconds("5e-6") == 5e-6
