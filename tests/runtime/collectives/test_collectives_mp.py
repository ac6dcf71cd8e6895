"""Real gloo groups of 2, 3, 4 and 5 processes: every all-reduce algorithm against the exact sum and
against ``dist.all_reduce``, hierarchical on 4 ranks as 2 nodes x 2, DDP training with every hook,
the compression hooks, measured against predicted wire bytes, clear errors and the timeout.

Each world size is spawned once (cached per world size); the cases are drawn here, with a seeded
RNG, and every judgement is made here from the workers' raw results.
"""

from __future__ import annotations

import functools
import math
import os
import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.conftest import REPO
from tests.runtime.collectives.workers import reference_losses
from trainplan.runtime.collectives.wire import allreduce_elements_sent
from trainplan.runtime.compression import CompressionOptions, wire_bytes_per_step
from trainplan.runtime.local_workers import run_local_workers

pytestmark = pytest.mark.slow

WORLD_SIZES = (2, 3, 4, 5)
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
ELEMENT_SIZE = {"fp32": 4, "bf16": 2}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
TRAIN = {"seed": 0, "hidden": 16, "per_rank": 3, "lr": 0.1, "steps": 5, "topk_ratio": 0.1,
         "powersgd_steps": 12, "powersgd_hidden": 32}
TIMEOUT_S = 1.5


def draw_cases(world: int, count: int = 30) -> list[dict[str, Any]]:
    """Edge lengths (empty, below, at and around the group size, a prime) and random ones up to 5000,
    two long ones that are cut into pieces / chunks; random dtype, scale and seed."""
    rng = random.Random(1000 + world)
    lengths = [0, 1, world - 1, world, world + 1, 2 * world + 1, 97] + [rng.randint(1, 5000) for _ in range(count)]
    lengths += [300_001, 600_007]
    cases = []
    for i, numel in enumerate(lengths):
        dtype = ("fp32", "bf16")[i % 2] if i < 7 else rng.choice(("fp32", "bf16"))
        scale = rng.choice((1e-3, 1.0, 1e3))
        cases.append({"numel": numel, "dtype": dtype, "scale": scale, "seed": rng.randrange(2**31)})
    return cases


def config(world: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"cases": draw_cases(world), "train": TRAIN}
    if world == 5:
        cfg.update(subgroup=[0, 2, 3, 4], subgroup_cases=10)
    if world == 2:
        cfg["timeout_s"] = TIMEOUT_S
    return cfg


@functools.cache
def spawn(world: int) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """(world size, config, per-rank results) of one spawn of the whole worker, once per world size."""
    cfg = config(world)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        results = run_local_workers("tests.runtime.collectives.workers:collectives_worker", world, backend="gloo",
                                    config=cfg, threads=1, timeout_s=300, group_timeout_s=60)
    return world, cfg, results


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=[f"n{n}" for n in WORLD_SIZES])
def group(request: pytest.FixtureRequest) -> Iterator[tuple[int, dict[str, Any], list[dict[str, Any]]]]:
    yield spawn(request.param)


def gamma(k: int, u: float) -> float:
    """Higham's gamma_k = k·u / (1 - k·u): the bound of any k-addition summation, relative to Σ|x_i|."""
    return k * u / (1 - k * u)


def expected_bytes(run: dict[str, Any], numel: int, world: int, rank: int, element_size: int) -> int:
    options = run["options"]
    return allreduce_elements_sent(run["algo"], numel, world, rank, options.get("local_size"),
                                   options.get("inter", "ring")) * element_size


def check_cases(world: int, cases: list[dict[str, Any]], per_rank: list[list[dict[str, Any]]]) -> None:
    for i, case in enumerate(cases):
        bound = gamma(world - 1, UNIT_ROUNDOFF[case["dtype"]]) * 1.001
        assert per_rank[0][i]["native_err"] <= bound, (case, "our error bound does not even hold for native")
        for j, run in enumerate(per_rank[0][i]["runs"]):
            label = (case, run["algo"], run["options"])
            assert run["err"] <= bound, label
            assert run["vs_native"] <= 2 * bound, label
            assert {r[i]["runs"][j]["digest"] for r in per_rank} == {run["digest"]}, ("ranks differ", label)
            for rank, results in enumerate(per_rank):
                mine = results[i]["runs"][j]
                assert mine["sent"] + mine["modeled"] == expected_bytes(
                    mine, case["numel"], world, rank, ELEMENT_SIZE[case["dtype"]]), ("bytes", rank, label)
                if mine["algo"] == "native":
                    assert mine["sent"] == 0, label
                elif mine["options"].get("inter") != "native":
                    assert mine["modeled"] == 0, label


def test_every_algorithm_equals_the_exact_sum_and_native(group: Any) -> None:
    world, cfg, results = group
    check_cases(world, cfg["cases"], [r["cases"] for r in results])
    algos = {(run["algo"], str(run["options"])) for run in results[0]["cases"][0]["runs"]}
    assert {"native", "ring", "tree", "hierarchical"} <= {a for a, _ in algos}


def test_hierarchical_two_nodes_of_two_ranks() -> None:
    world, cfg, results = spawn(4)
    seen = 0
    for i, case in enumerate(cfg["cases"]):
        for run in results[0]["cases"][i]["runs"]:
            if run["algo"] == "hierarchical" and run["options"].get("local_size") == 2:
                seen += 1
                assert run["err"] <= gamma(3, UNIT_ROUNDOFF[case["dtype"]]) * 1.001
    assert seen == 3 * len(cfg["cases"])  # inter ring, tree and native


def test_algorithms_on_a_subgroup_that_skips_a_rank() -> None:
    world, cfg, results = spawn(5)
    members = cfg["subgroup"]
    assert results[1]["subgroup"] is None
    per_member = [results[m]["subgroup"] for m in members]
    check_cases(len(members), cfg["cases"][: cfg["subgroup_cases"]], per_member)


def losses_close(a: list[float], b: list[float], rel: float = 1e-5) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel) for x, y in zip(a, b))


def test_plain_ddp_matches_one_process(group: Any) -> None:
    world, _, results = group
    reference = reference_losses(world, TRAIN)
    assert reference[-1] < reference[0]
    for r in results:
        assert losses_close(r["training"]["plain"]["losses"], reference)


def test_every_hook_trains_like_native_ddp(group: Any) -> None:
    world, _, results = group
    for r in results:
        training = r["training"]
        for name in ("native", "ring", "tree", "hierarchical", "ring_buckets"):
            assert losses_close(training[name]["losses"], training["plain"]["losses"]), name
            assert training[name]["calls"] >= TRAIN["steps"]
        # several buckets per step once DDP rebuilt them after step 1 (step 1 has its 1 MiB first bucket)
        assert training["ring_buckets"]["calls"] >= 1 + 2 * (TRAIN["steps"] - 1)


def local_size(world: int) -> int:
    return 2 if world % 2 == 0 and world > 2 else world


def test_hook_bytes_equal_the_prediction(group: Any) -> None:
    world, _, results = group
    for rank, r in enumerate(results):
        for algo in ("native", "ring", "tree", "hierarchical"):
            run = r["training"][algo]
            predicted = wire_bytes_per_step([run["shapes"]], world, algorithm=algo, local_size=local_size(world))
            assert run["bytes"] == [predicted[rank]] * TRAIN["steps"], (algo, rank)
        for name, run in r["compression"]["cast"].items():
            kind, algo = name.split("/")
            predicted = wire_bytes_per_step([run["shapes"]], world, compression=kind, algorithm=algo,
                                            local_size=local_size(world))
            assert run["bytes"] == [predicted[rank]] * len(run["bytes"]), (name, rank)


def test_fp16_and_bf16_hooks_are_within_their_precision(group: Any) -> None:
    world, _, results = group
    for r in results:
        for name, run in r["compression"]["cast"].items():
            u = UNIT_ROUNDOFF[name.split("/")[0]]
            for applied, true, true_abs in zip(run["applied"], run["true"], run["true_abs"]):
                for a, t, s in zip(applied, true, true_abs):
                    bound = (world * u * 1.01 + world * 2.0**-23) * s + world * 2.0**-24
                    assert abs(a - t) <= bound, (name, a, t, s)
            low = torch.tensor(run["applied"]).to(DTYPES[name.split("/")[0]]).float()
            assert low.tolist() == run["applied"], (name, "the sent values were not in the low dtype")


def test_topk_error_feedback_conserves_the_gradient(group: Any) -> None:
    world, _, results = group
    for r in results:
        for exchange, run in r["compression"]["topk"].items():
            numel = len(run["residual"])
            applied = [sum(step[i] for step in run["applied"]) for i in range(numel)]
            true = [sum(step[i] for step in run["true"]) for i in range(numel)]
            scale = [sum(step[i] for step in run["true_abs"]) for i in range(numel)]
            for a, e, t, s in zip(applied, run["residual"], true, scale):
                assert abs(a + e - t) <= 1e-5 * s + 1e-9, (exchange, a, e, t)
            assert max(abs(e) for e in run["residual"]) > 0, "nothing was held back"
            k = math.ceil(TRAIN["topk_ratio"] * numel)
            for step in run["applied"]:
                assert sum(1 for v in step if v != 0) <= world * k


def test_topk_bytes_equal_the_prediction(group: Any) -> None:
    world, _, results = group
    options = CompressionOptions(topk_ratio=TRAIN["topk_ratio"])
    for rank, r in enumerate(results):
        for exchange, run in r["compression"]["topk"].items():
            predicted = wire_bytes_per_step([run["shapes"]], world, compression="topk", algorithm=exchange,
                                            options=options)
            assert run["bytes"] == [predicted[rank]] * TRAIN["steps"], exchange


def test_powersgd_compresses_reduces_the_loss_and_counts_its_bytes(group: Any) -> None:
    world, _, results = group
    options = CompressionOptions(powersgd_rank=1, powersgd_start_iter=2)
    for rank, r in enumerate(results):
        run = r["compression"]["powersgd"]
        assert run["losses"][-1] < 0.9 * run["losses"][0]
        assert run["iter"] == TRAIN["powersgd_steps"]
        assert run["numel_after"] * 2 < run["numel_before"]
        plain = wire_bytes_per_step([run["shapes"]], world)[rank]
        compressed = wire_bytes_per_step([run["shapes"]], world, compression="powersgd", options=options)[rank]
        assert compressed * 2 < plain
        assert run["bytes"] == [plain] * 2 + [compressed] * (TRAIN["powersgd_steps"] - 2)


def test_bad_arguments_are_clear_errors(group: Any) -> None:
    world, _, results = group
    errors = results[0]["errors"]
    assert "unknown all-reduce algorithm 'butterfly'" in errors["unknown"]
    assert f"positive divisor of the group size {world}" in errors["local_size"]
    assert "must be contiguous" in errors["strided"]
    assert "use algorithm 'native'" in errors["powersgd_ring"]
    assert "must be one of ring, native" in errors["topk_tree"]


def test_a_missing_peer_is_a_timeout_error_not_a_hang() -> None:
    world, cfg, results = spawn(2)
    outcome = results[0]["timeout"]
    assert outcome["error"] is not None
    assert outcome["error"].startswith("allreduce_ring: rank 0 of 2: step ")
    assert "rank 1" in outcome["error"] and "Timed out" in outcome["error"]
    assert TIMEOUT_S * 0.9 <= outcome["elapsed"] < TIMEOUT_S + 10
