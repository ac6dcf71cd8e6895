import pytest

from trainplan.ir.cluster import Cluster, deep_merge, expand_preset, load_preset, preset_names


def test_every_preset_loads():
    assert set(preset_names()) >= {"a100-80g", "h100-80g", "h200", "v100-32g", "cpu-local"}
    for name in preset_names():
        c = load_preset(name)
        assert c.preset == name
        assert c.device.memory > 0 and c.intra_node.bandwidth > 0


def test_a100_preset_matches_dgx_a100():
    c = load_preset("a100-80g", nodes=128)
    assert c.world_size == 1024
    assert c.device.peak("bf16") == pytest.approx(312e12)
    assert c.device.memory == 80 * 2**30
    assert c.inter_node.bandwidth == pytest.approx(25e9)  # 200 Gb/s HDR per GPU


def test_override_keeps_the_rest_of_the_preset():
    c = Cluster.model_validate(expand_preset({"preset": "a100-80g", "nodes": 2, "device": {"memory": "40 GiB"}}))
    assert c.device.memory == 40 * 2**30
    assert c.device.peak("bf16") == pytest.approx(312e12)
    assert c.nodes == 2


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="known presets: .*a100-80g"):
        expand_preset({"preset": "a200"})


def test_deep_merge_does_not_mutate_inputs():
    base = {"a": {"b": 1, "c": 2}}
    out = deep_merge(base, {"a": {"b": 3}})
    assert out == {"a": {"b": 3, "c": 2}} and base == {"a": {"b": 1, "c": 2}}


def test_link_for_span():
    c = load_preset("a100-80g", nodes=2)
    assert c.link_for_span(8) == c.intra_node
    assert c.link_for_span(16) == c.inter_node
