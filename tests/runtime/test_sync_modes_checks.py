"""Fast checks of the consistency modes: what the runtime refuses, the straggler option, the
parameter server's shard assignment and staleness rule (no processes)."""

from __future__ import annotations

import pytest
import torch

from tests.runtime.plans import GPT_TP_STYLES, gpt_spec, make_plan
from trainplan.runtime.data_parallel import check_data_parallel, local_size, parse_straggler
from trainplan.runtime.errors import PlanExecutionError
from trainplan.runtime.launch import straggler_args
from trainplan.runtime.ps import Push, Shard, assign_shards


@pytest.mark.parametrize(("layout", "message"), [
    (dict(dp=4, zero=2, allreduce="tree"), "which zero: 2 .FSDP2. does not take"),
    (dict(dp=4, zero=3, allreduce="ring", compression="fp16"), "zero 2/3 also take allreduce: ring, uncompressed"),
    (dict(dp=2, tp=2, allreduce="tree", tp_styles=GPT_TP_STYLES), "tensor parallelism .FSDP2 replicate."),
    (dict(dp=4, compression="topk", allreduce="tree"), "use allreduce: ring or native, not tree"),
    (dict(dp=4, compression="powersgd", allreduce="ring"), "use allreduce: native, not ring"),
    (dict(dp=4, sync="async"), "sync: async needs a parameter server"),
    (dict(dp=2, pp=2, allreduce="ps"), "allreduce: ps runs on plain data parallelism"),
    (dict(dp=4, zero=1, sync="local_sgd"), "sync: local_sgd runs on plain data parallelism"),
    (dict(dp=4, allreduce="ps", compression="fp16"), "exchanges uncompressed tensors"),
    (dict(dp=4, allreduce="ps", sync="local_sgd"), "use allreduce: native, ring, tree or hierarchical, not ps"),
    (dict(dp=4, allreduce="ps", comm={"ps_servers": 5}), "comm.ps_servers .5. exceeds the 4"),
    (dict(dp=4, allreduce="hierarchical", comm={"local_size": 3}), "comm.local_size .3. must divide dp .4."),
])
def test_refused_before_launch_with_the_alternative(layout: dict, message: str) -> None:
    with pytest.raises(PlanExecutionError, match=message):
        check_data_parallel(make_plan(gpt_spec(4), **layout))


DEDICATED = {"ps_servers": 2, "ps_placement": "dedicated"}


@pytest.mark.parametrize(("layout", "message"), [
    (dict(dp=1, pp=2, allreduce="ps", comm=DEDICATED), "allreduce: ps runs on plain data parallelism"),
    (dict(dp=2, allreduce="ps", compression="fp16", comm=DEDICATED), "exchanges uncompressed tensors"),
])
def test_dedicated_servers_refused_like_colocated(layout: dict, message: str) -> None:
    """The checks hold with dedicated servers too, also with one worker (its servers still serve)."""
    with pytest.raises(PlanExecutionError, match=message):
        check_data_parallel(make_plan(gpt_spec(4), **layout))


def test_dedicated_servers_accepted_and_run_their_own_loop() -> None:
    """Dedicated servers may outnumber the workers (they are ranks of their own); one worker with
    dedicated servers still runs the parameter server, not the plain loop."""
    from trainplan.runtime.data_parallel import own_exchange
    from trainplan.runtime.ps import topology

    many = make_plan(gpt_spec(5), dp=2, allreduce="ps", comm={"ps_servers": 3, "ps_placement": "dedicated"})
    check_data_parallel(many)
    assert topology(many).workers == [0, 1] and topology(many).servers == [2, 3, 4]
    single = make_plan(gpt_spec(3), dp=1, allreduce="ps", comm=DEDICATED)
    check_data_parallel(single)
    assert own_exchange(single) and single.world_size == 3
    colocated = make_plan(gpt_spec(4), dp=4, allreduce="ps", comm={"ps_servers": 2})
    assert topology(colocated).servers == [0, 1] and not own_exchange(make_plan(gpt_spec(1), allreduce="ps"))


def test_accepted_combinations() -> None:
    for layout in (dict(dp=4, zero=1, allreduce="ring", compression="fp16"), dict(dp=4, compression="bf16"),
                   dict(dp=2, pp=2, allreduce="tree"), dict(dp=4, allreduce="ps", sync="async"),
                   dict(dp=4, zero=3, allreduce="ring"),
                   dict(dp=4, sync="local_sgd", allreduce="hierarchical", comm={"local_size": 2}),
                   dict(dp=1, tp=4, zero=3, compression="topk", tp_styles=GPT_TP_STYLES)):
        check_data_parallel(make_plan(gpt_spec(4), **layout))


def test_hierarchical_local_size_defaults_to_the_ranks_sharing_a_node() -> None:
    spec = gpt_spec(4)
    spec["cluster"] = {"preset": "cpu-local", "devices_per_node": 2, "nodes": 2}
    assert local_size(make_plan(spec, dp=4, allreduce="hierarchical")) == 2
    assert local_size(make_plan(gpt_spec(4), dp=4, allreduce="hierarchical")) == 4


def test_straggler_option() -> None:
    assert parse_straggler("1:0.25") == (1, 0.25)
    for bad in ("1", "a:1", "-1:1", "1:-2", "1:inf", ""):
        with pytest.raises(ValueError, match="expected RANK:SECONDS"):
            parse_straggler(bad)
    assert straggler_args((1, 0.5), 4) == ["--straggler", "1:0.5"]
    with pytest.raises(PlanExecutionError, match="rank 4 does not exist among 4 processes"):
        straggler_args((4, 0.5), 4)


def test_shards_balance_elements_greedily() -> None:
    assert assign_shards([10, 1, 1, 8, 3], 2) == [0, 1, 1, 1, 0]
    assert assign_shards([5, 5, 5], 3) == [0, 1, 2]


def _push(shard: Shard, worker: int, step: int, grad: float, base: int = 0) -> None:
    shard.receive(Push(worker, step, base, torch.full((2,), grad)))


def test_sync_server_applies_the_mean_once_per_step() -> None:
    plan = make_plan(gpt_spec(4, optimizer="sgd", lr=1.0), dp=4, allreduce="ps")
    shard = Shard(plan, [torch.zeros(2)], workers=2, mode="sync", staleness=0)
    _push(shard, 0, 0, 1.0)
    assert shard.version == 0 and shard.ready() == []  # waits for the other worker
    _push(shard, 1, 0, 3.0)
    assert shard.version == 1 and sorted(shard.ready()) == [0, 1]
    assert shard.reply(0).shard.tolist() == [-2.0, -2.0]  # p - lr * mean(1, 3)


def test_async_server_holds_back_a_worker_more_than_s_pushes_ahead() -> None:
    plan = make_plan(gpt_spec(4, optimizer="sgd", lr=1.0), dp=4, allreduce="ps", sync="async")
    shard = Shard(plan, [torch.zeros(2)], workers=2, mode="async", staleness=1)
    _push(shard, 0, 0, 2.0)
    assert shard.version == 1 and shard.ready() == [0]  # 1 ahead of the slowest: within s = 1
    shard.reply(0)
    _push(shard, 0, 1, 2.0, base=1)
    assert shard.ready() == []  # 2 ahead: waits
    _push(shard, 1, 0, 2.0)  # computed on version 0, applied at version 2
    assert sorted(shard.ready()) == [0, 1]
    assert shard.reply(1).staleness == 2 and shard.reply(0).shard.tolist() == [-3.0, -3.0]  # 3 pushes of g/n


def test_library_step_refuses_modes_that_need_their_own_loop() -> None:
    from trainplan.runtime.api import parallelize

    with pytest.raises(PlanExecutionError, match="runs only under `trainplan run`"):
        parallelize(torch.nn.Linear(2, 2), make_plan(gpt_spec(4), dp=4, sync="local_sgd"))
