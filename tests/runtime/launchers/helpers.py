"""Shared by the launcher tests: the probe entry point and how to judge the world it reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROBE = Path(__file__).with_name("rank_probe.py")


def probe_command(plan: Path, out: Path, *extra: str) -> list[str]:
    """The test entry point each rank runs instead of the trainplan worker."""
    return [sys.executable, str(PROBE), "--plan", str(plan), "--out", str(out), *extra]


def rank_results(out: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in sorted(out.glob("rank-*.json"))}


def check_world(results: dict[int, dict], *, nodes: int, nproc: int) -> None:
    """Every rank reported; ranks, local ranks and node ranks are those of nodes x nproc; the all-reduce summed all."""
    world = nodes * nproc
    assert sorted(results) == list(range(world))
    assert {r["env"]["WORLD_SIZE"] for r in results.values()} == {str(world)}
    assert {r["rank_sum"] for r in results.values()} == {world * (world - 1) // 2}
    node_of_rank = [int(results[r]["env"]["GROUP_RANK"]) for r in range(world)]
    assert sorted(node_of_rank) == sorted(n for n in range(nodes) for _ in range(nproc))
    assert all(r["node_of_rank"] == node_of_rank for r in results.values())  # every rank saw the same placement
    for node in range(nodes):
        local = sorted(int(r["env"]["LOCAL_RANK"]) for r in results.values() if int(r["env"]["GROUP_RANK"]) == node)
        assert local == list(range(nproc))
    assert {r["env"]["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] for r in results.values()} == {"1"}
