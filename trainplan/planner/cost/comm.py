"""Communication time: alpha-beta costs of collectives and point-to-point transfers.

A message of ``S`` bytes over a link of bandwidth ``B`` (bytes/s per rank per direction) and
latency ``α`` (seconds) takes ``α + S/B`` (Hockney 1994, "The communication challenge for MPP").
Each collective below is that model applied to the steps of its algorithm. ``n`` is the group size;
sizes are the full (unsharded) buffer in bytes unless a docstring says otherwise.

Which link a group uses depends on the level it spans (:func:`group_link`): a group inside one
node uses the intra-node link, a group that crosses nodes the inter-node network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from trainplan.ir.cluster import Cluster
from trainplan.ir.facts import TransformerFacts

AllReduceAlgorithm = Literal["native", "ring", "tree", "hierarchical", "ps"]
Compression = Literal["none", "fp16", "bf16", "topk", "powersgd"]


class LinkLike(Protocol):
    """Anything with a bandwidth (bytes/s per rank per direction) and a latency (s): a
    :class:`~trainplan.ir.cluster.Link` or a :class:`LinkCost`."""

    @property
    def bandwidth(self) -> float: ...

    @property
    def latency(self) -> float: ...


@dataclass(frozen=True, slots=True)
class LinkCost:
    """The link one rank of a group sees: bandwidth in bytes/s per direction, latency in s."""

    bandwidth: float
    latency: float
    level: Literal["intra", "inter"]
    all_gather_latency: float | None = None  # torch.distributed's own all-gather, per ring step (None: ``latency``)
    reduce_scatter_latency: float | None = None  # torch.distributed's own reduce-scatter, per ring step


def _check(nbytes: float, n: int) -> None:
    if nbytes < 0:
        raise ValueError(f"message size must be non-negative bytes, got {nbytes}")
    if n <= 0:
        raise ValueError(f"group size must be positive, got {n}")


# ----------------------------------------------------------------------------------- collectives


def p2p_time_s(nbytes: float, link: LinkLike) -> float:
    """One message between two ranks: ``α + S/B`` seconds (Hockney's model)."""
    _check(nbytes, 1)
    return link.latency + nbytes / link.bandwidth


def ring_allreduce_time_s(nbytes: float, n: int, link: LinkLike) -> float:
    """Ring all-reduce: ``2(n−1)/n · S/B + 2(n−1)·α`` seconds.

    Patarasuk & Yuan 2009 ("Bandwidth optimal all-reduce algorithms for clusters of
    workstations", Sec. 3): a reduce-scatter and an all-gather of ``n − 1`` steps each, every step
    moving ``S/n`` bytes per rank.
    """
    _check(nbytes, n)
    if n == 1:
        return 0.0
    return 2.0 * (n - 1) / n * nbytes / link.bandwidth + 2.0 * (n - 1) * link.latency


def tree_allreduce_time_s(nbytes: float, n: int, link: LinkLike) -> float:
    """Pipelined (double) binary tree all-reduce: ``2·⌈log2 n⌉·α + 2·S/B`` seconds.

    Sanders, Speck & Träff 2009 ("Two-tree algorithms for full bandwidth broadcast, reduction and
    scan", Sec. 3-4): two complementary binary trees each carry half the data, so a pipelined
    reduction costs ``S/B`` plus a latency term proportional to the depth ``log2 n``, and the
    broadcast back the same; NCCL's tree all-reduce is this algorithm. Pipeline fill beyond the
    depth term is ignored.
    """
    _check(nbytes, n)
    if n == 1:
        return 0.0
    return 2.0 * math.ceil(math.log2(n)) * link.latency + 2.0 * nbytes / link.bandwidth


def native_latency(link: LinkLike, collective: Literal["all_gather", "reduce_scatter"]) -> float:
    """Per ring step latency of torch.distributed's own ``collective`` on ``link``: the link's measured
    figure for it (``Link.all_gather_latency`` / ``reduce_scatter_latency``, ``trainplan calibrate``)
    where it has one, else its ``latency``. Backends do not all run these as the ring the model
    assumes: gloo's reduce-scatter measured about a whole all-reduce's time (4 processes, 2 cores)."""
    measured = getattr(link, f"{collective}_latency", None)
    return link.latency if measured is None else measured


def reduce_scatter_time_s(nbytes: float, n: int, link: LinkLike, *, native: bool = True) -> float:
    """Ring reduce-scatter of an ``S``-byte buffer: ``(n−1)/n · S/B + (n−1)·α`` seconds.

    Half of the ring all-reduce (Patarasuk & Yuan 2009, Sec. 3); ZeRO stage 2/3 and FSDP reduce
    gradients this way (Rajbhandari et al. 2020, Sec. 7). ``native``: torch.distributed's
    ``reduce_scatter_tensor``, whose per-step latency may be measured apart (:func:`native_latency`);
    ``False`` for trainplan's own point-to-point rings, which pay the link's ``α``.
    """
    return _ring_half(nbytes, n, link.bandwidth, native_latency(link, "reduce_scatter") if native else link.latency)


def all_gather_time_s(nbytes: float, n: int, link: LinkLike, *, native: bool = True) -> float:
    """Ring all-gather producing an ``S``-byte buffer: ``(n−1)/n · S/B + (n−1)·α`` seconds.

    The second half of the ring all-reduce (Patarasuk & Yuan 2009); ZeRO stage 3 / FSDP gather
    parameters this way before each forward and backward (Rajbhandari et al. 2020, Sec. 7.2.3).
    ``native`` as in :func:`reduce_scatter_time_s`.
    """
    return _ring_half(nbytes, n, link.bandwidth, native_latency(link, "all_gather") if native else link.latency)


def _ring_half(nbytes: float, n: int, bandwidth: float, alpha: float) -> float:
    _check(nbytes, n)
    return 0.0 if n == 1 else (n - 1) / n * nbytes / bandwidth + (n - 1) * alpha


def zero3_comm_time_s(
    param_bytes: float, grad_bytes: float, n: int, link: LinkLike, microbatches: int,
    *, collectives: int = 1, gathers_per_microbatch: int = 2, native_scatter: bool = True,
) -> tuple[float, float]:
    """(gradient reduce-scatter, parameter all-gathers) seconds of one ZeRO-3 training step.

    What is modelled is what trainplan's runtime executes for ZeRO-3: PyTorch FSDP2
    ``fully_shard(reshard_after_forward=True)`` with gradient accumulation under
    ``set_requires_gradient_sync(False)`` (trainplan.runtime.data_parallel). FSDP2's
    pre-forward and pre-backward hooks all-gather the parameters and its post-forward and
    post-backward hooks free them (PyTorch documentation, ``torch.distributed.fsdp.fully_shard``,
    the user contract; ``reshard_after_backward`` defaults to true), so every one of the ``m``
    micro-batches all-gathers the parameters twice, once for its forward and once for its
    backward; the gradients are reduce-scattered once per step, in the last micro-batch's
    backward. No parameter all-gather follows the update: each rank keeps only its shard.

    Volume: ``Ψ`` bytes reduce-scattered plus ``2·m·Ψ`` gathered. With ``m = 1`` that is the
    ``3Ψ`` of Rajbhandari et al. 2020 (Sec. 7.2.2), 1.5x baseline data parallelism's ``2Ψ``
    all-reduce; DeepSpeed's stage 3 likewise re-gathers per micro-batch. Each collective is a ring
    (:func:`reduce_scatter_time_s`, :func:`all_gather_time_s`); ``param_bytes`` at the compute
    dtype, ``grad_bytes`` at the gradient's wire dtype.

    FSDP2 runs one collective per FSDP unit (every block and the root module are units in
    trainplan's runtime), so each of these exchanges is ``collectives`` rings over ``1/collectives``
    of the bytes: the same volume, ``collectives`` times the latency — which dominates on links
    whose latency is large next to a block's bytes (gloo between processes sharing cores).
    ZeRO-2 as the runtime runs it (``reshard_after_forward=False``) keeps the gathered parameters
    from a micro-batch's forward to its backward and frees them after: one gather per
    micro-batch, ``gathers_per_microbatch = 1``. ``native_scatter``: FSDP2's own reduce-scatter
    (``False`` when the runtime gives it trainplan's point-to-point ring, ``allreduce: ring``).
    """
    if microbatches <= 0 or collectives <= 0 or gathers_per_microbatch <= 0:
        raise ValueError(f"micro-batches, collectives and gathers must be positive, got {microbatches}, "
                         f"{collectives}, {gathers_per_microbatch}")
    k = collectives
    scatter = k * reduce_scatter_time_s(grad_bytes / k, n, link, native=native_scatter)
    gathers = gathers_per_microbatch * microbatches * k * all_gather_time_s(param_bytes / k, n, link)
    return scatter, gathers


def zero1_broadcast_time_s(param_bytes: float, n: int, link: LinkLike) -> float:
    """Seconds to send every rank the parameters the others updated, as ZeRO-1 runs in trainplan's runtime.

    torch's ``ZeroRedundancyOptimizer`` (with ``parameters_as_bucket_view``) steps the 1/n of the
    parameters each rank owns and then broadcasts each owner's flat bucket to the group: ``n``
    broadcasts of ``S/n`` bytes, each a pipelined binary tree (``⌈log2 n⌉·α + (S/n)/β``, the one-way
    half of the two-tree reduction of Sanders, Speck & Träff 2009). Total: ``n·⌈log2 n⌉·α + S/β``.
    It runs after the optimizer step, so nothing overlaps it. The gradients before it are
    all-reduced in full by DDP (``2(n−1)/n·S`` of traffic), so this runtime's ZeRO-1 moves about 1.5x
    the ``2Ψ`` of Rajbhandari et al. 2020 (Sec. 7.2.1), whose stage 1 reduce-scatters instead.
    """
    _check(param_bytes, n)
    if n == 1:
        return 0.0
    return n * (math.ceil(math.log2(n)) * link.latency + param_bytes / n / link.bandwidth)


def allreduce_time_s(
    nbytes: float, n: int, link: LinkLike, algorithm: Literal["native", "ring", "tree"]
) -> float:
    """All-reduce of ``S`` bytes among ``n`` ranks over one link level, by algorithm.

    ``native`` is what the backend picks: NCCL's tuner chooses, per message size, the fastest of
    its ring and tree algorithms (NCCL documentation, ``NCCL_ALGO``), modelled as the minimum of
    the two. Hierarchical and parameter-server reductions span two levels or separate servers:
    :func:`hierarchical_allreduce_time_s`, :func:`ps_allreduce_time_s`, :func:`dp_allreduce_time_s`.
    """
    if algorithm == "ring":
        return ring_allreduce_time_s(nbytes, n, link)
    if algorithm == "tree":
        return tree_allreduce_time_s(nbytes, n, link)
    if algorithm == "native":
        return min(ring_allreduce_time_s(nbytes, n, link), tree_allreduce_time_s(nbytes, n, link))
    raise ValueError(f"unknown single-level all-reduce {algorithm!r}; expected 'native', 'ring' or 'tree'")


def hierarchical_allreduce_time_s(
    nbytes: float, local: int, nodes: int, intra: LinkLike, inter: LinkLike
) -> float:
    """Two-level all-reduce over ``nodes`` nodes with ``local`` group members on each.

    Jia et al. 2018 ("Highly scalable deep learning training system with mixed-precision",
    Sec. 4.3, hierarchical all-reduce): a reduce-scatter inside each node leaves each local rank
    ``S/local`` bytes; the ranks with the same local index ring-all-reduce that shard across the
    nodes (``local`` rings at once, each on its rank's share of the network); an all-gather inside
    the node restores the full buffer:
    ``RS(S, local, intra) + AR_ring(S/local, nodes, inter) + AG(S, local, intra)``.
    """
    _check(nbytes, local * nodes)
    return (
        reduce_scatter_time_s(nbytes, local, intra, native=False)
        + ring_allreduce_time_s(nbytes / local, nodes, inter)
        + all_gather_time_s(nbytes, local, intra, native=False)
    )


def ps_allreduce_time_s(nbytes: float, workers: int, servers: int, link: LinkLike) -> float:
    """Synchronous parameter-server reduction: every worker pushes ``S`` bytes and pulls ``S`` back.

    Li et al. 2014 ("Scaling distributed machine learning with the parameter server", OSDI,
    Sec. 3) with the bandwidth analysis of Jiang et al. 2020 (BytePS, OSDI, Sec. 3.1): the buffer
    is sharded over ``servers`` servers, so each worker moves ``S`` bytes per direction and each
    server ``workers·S/servers``; the slower side sets the pace. Servers are assumed to have the
    same link as workers. Push and pull: ``2·(α + max(S, workers·S/servers)/B)``.
    """
    _check(nbytes, workers)
    if servers <= 0:
        raise ValueError(f"a parameter server needs at least one server process, got {servers}")
    busiest = max(nbytes, workers * nbytes / servers)
    return 2.0 * (link.latency + busiest / link.bandwidth)


# ----------------------------------------------------------------------------------- which link


def group_fits_in_node(devices_per_node: int, group_size: int, stride: int) -> bool:
    """Whether every group of ``group_size`` ranks spaced ``stride`` apart lies inside one node.

    With ranks numbered node by node and groups of one kind tiling the ranks (Megatron-LM's
    ``tp`` innermost order), the groups repeat every ``stride·group_size`` ranks; all of them are
    inside nodes exactly when that period divides the node size.
    """
    if group_size <= 0 or stride <= 0:
        raise ValueError(f"group_size and stride must be positive, got {group_size} and {stride}")
    period = stride * group_size
    return group_size == 1 or (period <= devices_per_node and devices_per_node % period == 0)


def group_link(cluster: Cluster, group_size: int, stride: int, senders_per_node: int | None = None) -> LinkCost:
    """The link one member of a group sees: intra-node if the group fits in a node, else the network.

    Inter-node bandwidth: the presets give ``inter_node.bandwidth`` per device, i.e. the node's
    network bandwidth divided by its ``d`` devices (``Cluster.inter_node``). We assume the node's
    network is one pool of ``d · B_inter`` bytes/s shared evenly by the ranks that send across
    nodes at the same moment: with ``k = senders_per_node`` of them each gets ``d·B_inter/k``.
    The default ``k = d`` — every device of the node is in some group of this kind and they all
    communicate at once, as data-parallel gradient reduction does — gives exactly ``B_inter``.
    Pass a smaller ``k`` only when fewer ranks of a node cross the network at once (and the NICs
    are shared, e.g. one NIC per host); on rail-optimised clusters with one NIC per GPU keep ``d``.
    """
    d = cluster.devices_per_node
    if group_fits_in_node(d, group_size, stride) or cluster.nodes == 1:
        link = cluster.intra_node
        return LinkCost(link.bandwidth, link.latency, "intra", link.all_gather_latency, link.reduce_scatter_latency)
    k = d if senders_per_node is None else senders_per_node
    if not 1 <= k <= d:
        raise ValueError(f"senders_per_node must be between 1 and {d} (devices per node), got {k}")
    link = cluster.inter_node
    return LinkCost(link.bandwidth * d / k, link.latency, "inter", link.all_gather_latency, link.reduce_scatter_latency)


def dp_allreduce_time_s(
    cluster: Cluster, nbytes: float, dp: int, stride: int, algorithm: AllReduceAlgorithm, ps_servers: int | None = None
) -> float:
    """Gradient all-reduce of one data-parallel group (``dp`` ranks spaced ``stride`` apart).

    ``hierarchical`` splits the group into ``local`` members per node (``d // stride`` when the
    stride is below the node size) and ``dp / local`` nodes; when the group does not span nodes
    or has one member per node it is a ring. ``ps`` uses ``ps_servers`` servers (default: one per
    worker, the sharded setup BytePS recommends).
    """
    link = group_link(cluster, dp, stride)
    if algorithm in ("native", "ring", "tree"):
        return allreduce_time_s(nbytes, dp, link, algorithm)
    if algorithm == "ps":
        return ps_allreduce_time_s(nbytes, dp, ps_servers if ps_servers is not None else dp, link)
    if algorithm != "hierarchical":
        raise ValueError(f"unknown all-reduce algorithm {algorithm!r}")
    d = cluster.devices_per_node
    local = max(1, min(dp, d // stride)) if stride < d else 1
    if link.level == "intra" or local == 1 or dp % local:
        return ring_allreduce_time_s(nbytes, dp, link)
    intra = cluster.intra_node
    return hierarchical_allreduce_time_s(nbytes, local, dp // local, intra, link)


# ------------------------------------------------------------------------------- overlap and use


def dp_overlap_exposed_time(allreduce_s: float, backward_s: float, bucket_bytes: float, grad_bytes: float) -> float:
    """Seconds of gradient reduction left after the backward pass when buckets overlap it.

    PyTorch DDP (Li et al. 2020, "PyTorch Distributed", VLDB, Sec. 3.2.3) reduces gradients in
    ``k = ⌈grad_bytes / bucket_bytes⌉`` buckets as they become ready. With gradients ready at a
    uniform rate over the backward (bucket ``i`` at ``i/k · T_b``) and buckets reduced one after
    another (``A/k`` each), the last reduction ends ``max(A/k, A − (k−1)/k · T_b)`` after the
    backward: the last bucket always, plus whatever does not fit under the backward pass.
    """
    if min(allreduce_s, backward_s, grad_bytes) < 0 or bucket_bytes <= 0:
        raise ValueError(
            f"times and sizes must be non-negative and the bucket positive, got allreduce_s={allreduce_s}, "
            f"backward_s={backward_s}, bucket_bytes={bucket_bytes}, grad_bytes={grad_bytes}"
        )
    if grad_bytes == 0:
        return 0.0
    k = math.ceil(grad_bytes / bucket_bytes)
    return max(allreduce_s / k, allreduce_s - (k - 1) / k * backward_s)


def tp_comm_time_per_layer(
    facts: TransformerFacts, micro_batch: int, tp: int, link: LinkLike, sequence_parallel: bool, dtype_bytes: int
) -> tuple[float, float]:
    """(forward, backward) seconds of tensor-parallel communication of one layer and micro-batch.

    Megatron-LM (Shoeybi et al. 2019, Sec. 3, Fig. 4; Narayanan et al. 2021, Sec. 3.2): two
    all-reduces of the ``b·s·h`` activations in the forward (after attention and after the MLP)
    and two of their gradients in the backward. With sequence parallelism each all-reduce becomes
    an all-gather plus a reduce-scatter of the same total volume (Korthikanti et al. 2022,
    Sec. 4.2.2).
    """
    if tp == 1:
        return 0.0, 0.0
    nbytes = float(micro_batch) * facts.seq_len * facts.hidden * dtype_bytes
    if sequence_parallel:
        one = all_gather_time_s(nbytes, tp, link) + reduce_scatter_time_s(nbytes, tp, link)
    else:
        one = ring_allreduce_time_s(nbytes, tp, link)
    return 2.0 * one, 2.0 * one


# Megatron-LM's vocabulary-parallel cross-entropy all-reduces three values per token in the
# forward — the logit maximum, the target's logit and the sum of exponentials — each in fp32
# (Megatron-LM, megatron/core/tensor_parallel/cross_entropy.py, ``_VocabParallelCrossEntropy``).
CROSS_ENTROPY_ALLREDUCES = 3
CROSS_ENTROPY_BYTES = 4


def tp_edge_comm_time(
    kind: Literal["embedding", "head"],
    facts: TransformerFacts,
    micro_batch: int,
    tp: int,
    link: LinkLike,
    sequence_parallel: bool,
    dtype_bytes: int,
) -> tuple[float, float]:
    """(forward, backward) seconds of tensor-parallel communication of the vocabulary-parallel
    embedding or the column-parallel LM head, per micro-batch.

    Shoeybi et al. 2019 (Megatron-LM, Sec. 3, Fig. 3 and the "input embedding" / "output
    embedding" paragraphs) with the conjugate operators ``f`` (identity forward, all-reduce
    backward) and ``g`` (all-reduce forward, identity backward):

    * embedding: each rank looks up its slice of the vocabulary and the partial ``b·s·h``
      outputs are summed by ``g`` — an all-reduce in the **forward only**; the backward is local
      (each rank's weight gradient needs only the replicated output gradient it already holds).
    * LM head: column-parallel over the vocabulary, fused with a parallel cross-entropy so only
      ``b·s`` scalars cross ranks in the forward ("communicating scalar losses instead of
      logits"; three fp32 all-reduces in Megatron-LM's ``_VocabParallelCrossEntropy``); its input
      enters through ``f``, so the ``b·s·h`` input gradient is all-reduced in the **backward only**.

    With sequence parallelism (Korthikanti et al. 2022, Sec. 4.2.2, ``g``/``ḡ``) the embedding's
    all-reduce becomes a reduce-scatter into the sequence-split region and its backward an
    all-gather of the gradient; the head all-gathers its sequence-split input in the forward and
    reduce-scatters the input gradient in the backward (Megatron-LM's
    ``reduce_scatter_to_sequence_parallel_region`` / ``gather_from_sequence_parallel_region``).
    Seconds; ``dtype_bytes`` per activation element.
    """
    if kind not in ("embedding", "head"):
        raise ValueError(f"kind must be 'embedding' or 'head', got {kind!r}")
    if tp == 1:
        return 0.0, 0.0
    tokens = float(micro_batch) * facts.seq_len
    nbytes = tokens * facts.hidden * dtype_bytes
    if kind == "embedding":
        if sequence_parallel:
            return reduce_scatter_time_s(nbytes, tp, link), all_gather_time_s(nbytes, tp, link)
        return ring_allreduce_time_s(nbytes, tp, link), 0.0
    loss = CROSS_ENTROPY_ALLREDUCES * ring_allreduce_time_s(tokens * CROSS_ENTROPY_BYTES, tp, link)
    if sequence_parallel:
        return all_gather_time_s(nbytes, tp, link) + loss, reduce_scatter_time_s(nbytes, tp, link)
    return loss, ring_allreduce_time_s(nbytes, tp, link)


def pipeline_p2p_time(
    nbytes: float, link: LinkLike, tp: int, scatter_gather: bool, gather_link: LinkLike | None = None
) -> float:
    """Seconds to pass one micro-batch's ``S``-byte activation (or gradient) to the next stage.

    Without scatter/gather each of the ``t`` tensor-parallel ranks sends the whole (replicated)
    tensor: ``α + S/B``. Narayanan et al. 2021, Sec. 4.1 (scatter/gather optimisation): each rank
    sends ``S/t`` and the receiving ranks all-gather over ``gather_link`` (NVLink):
    ``α + S/(t·B) + AG(S, t)``.
    """
    if not scatter_gather or tp == 1:
        return p2p_time_s(nbytes, link)
    if gather_link is None:
        raise ValueError("scatter/gather needs the link of the tensor-parallel group for the all-gather")
    return p2p_time_s(nbytes / tp, link) + all_gather_time_s(nbytes, tp, gather_link)


def wire_bytes(
    numel: int,
    compression: Compression,
    *,
    dtype_bytes: int = 4,
    topk_ratio: float | None = None,
    index_bytes: int = 4,
    matrix_shapes: Sequence[tuple[int, int]] = (),
    powersgd_rank: int | None = None,
) -> float:
    """Bytes one worker puts on the wire for ``numel`` gradient elements of ``dtype_bytes`` each.

    * ``none``: ``numel · dtype_bytes``.
    * ``fp16``/``bf16``: 2 bytes per element (half of fp32 gradients; 16-bit gradients stay 2).
    * ``topk``: the ``⌈ratio·numel⌉`` largest values and their indices (Aji & Heafield 2017;
      Lin et al. 2018, "Deep Gradient Compression", Sec. 2).
    * ``powersgd``: each ``n×m`` matrix in ``matrix_shapes`` becomes the factors ``P`` (n×r) and
      ``Q`` (m×r), ``(n+m)·r`` elements (Vogels et al. 2019, Algorithm 1); a matrix for which that
      is not smaller, and every element outside the listed matrices (biases, norms), is sent as is.
    """
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    if compression == "none":
        return float(numel) * dtype_bytes
    if compression in ("fp16", "bf16"):
        return float(numel) * min(dtype_bytes, 2)
    if compression == "topk":
        if topk_ratio is None or not 0.0 < topk_ratio <= 1.0:
            raise ValueError(f"topk compression needs a ratio in (0, 1], got {topk_ratio}")
        return math.ceil(topk_ratio * numel) * float(dtype_bytes + index_bytes)
    if compression == "powersgd":
        return _powersgd_wire_bytes(numel, dtype_bytes, matrix_shapes, powersgd_rank)
    raise ValueError(f"unknown compression {compression!r}; expected 'none', 'fp16', 'bf16', 'topk' or 'powersgd'")


def _powersgd_wire_bytes(
    numel: int, dtype_bytes: int, matrix_shapes: Sequence[tuple[int, int]], rank: int | None
) -> float:
    if rank is None or rank <= 0:
        raise ValueError(f"powersgd compression needs a positive rank, got {rank}")
    in_matrices = sum(n * m for n, m in matrix_shapes)
    if in_matrices > numel:
        raise ValueError(f"the matrices hold {in_matrices} elements, more than numel={numel}")
    sent = sum(min((n + m) * rank, n * m) for n, m in matrix_shapes)
    return float(sent + numel - in_matrices) * dtype_bytes


# ------------------------------------------------------------------------- gradient compression

def _pass_bytes_per_element(compression: str, b: int) -> int:
    """Bytes moved (read + write) per gradient element of ``b`` bytes by the elementwise passes of
    trainplan.runtime.compression's hooks, counted from their code. Cast: read b, write 2 (16 bit),
    and back after the all-reduce (read 2, write b). Top-k: add the residual (read 2b, write b),
    |a| (read b, write b), selection (read b), zero the chosen and keep the residual (read b, write b)."""
    return 2 * (b + 2) if compression in ("fp16", "bf16") else 8 * b


def compression_compute_time_s(
    numel: float,
    compression: Compression,
    *,
    dtype_bytes: int = 4,
    memory_bandwidth: float | None,
    peak_flops: float,
    powersgd_rank: int = 1,
) -> float:
    """Seconds one worker spends compressing and decompressing ``numel`` gradient elements.

    Casting and top-k are memory-bound elementwise passes: bytes moved (above) over the device's
    memory bandwidth (0 when the cluster gives none). PowerSGD multiplies each ``n×m`` gradient
    matrix by ``Q`` (``m×r``), then by ``P`` transposed, and rebuilds ``P·Qᵀ``: ``3·2·n·m·r`` FLOPs
    (Vogels et al. 2019, Algorithm 1), i.e. ``6·r`` FLOPs per element at the device's peak.
    """
    if compression == "none":
        return 0.0
    if compression == "powersgd":
        return 6.0 * powersgd_rank * numel / peak_flops
    return numel * _pass_bytes_per_element(compression, dtype_bytes) / memory_bandwidth if memory_bandwidth else 0.0


def compressed_dp_time_s(
    cluster: Cluster,
    numel: float,
    dp: int,
    stride: int,
    algorithm: AllReduceAlgorithm,
    compression: Compression,
    *,
    dtype_bytes: int = 4,
    topk_ratio: float = 0.01,
    powersgd_rank: int = 1,
    matrix_rows: float | None = None,
) -> float:
    """Gradient exchange of ``numel`` elements with ``compression`` over a data-parallel group.

    fp16/bf16 and PowerSGD all-reduce their (smaller) payload with ``algorithm``
    (:func:`wire_bytes`; PowerSGD's matrices are taken as ``matrix_rows × (numel/matrix_rows)``,
    ``matrix_rows`` the hidden size, or square when unknown). Top-k cannot be summed on the way:
    every rank all-gathers the others' ``⌈k·N⌉`` (value, index) pairs, ``n·wire`` bytes gathered
    (Aji & Heafield 2017; Lin et al. 2018, Sec. 2).
    """
    if compression == "topk":
        sent = wire_bytes(int(numel), "topk", dtype_bytes=dtype_bytes, topk_ratio=topk_ratio)
        return all_gather_time_s(dp * sent, dp, group_link(cluster, dp, stride))
    shapes: tuple[tuple[int, int], ...] = ()
    if compression == "powersgd" and numel >= 1:
        rows = int(matrix_rows or math.isqrt(int(numel)) or 1)
        shapes = ((rows, max(1, int(numel) // rows)),)
    sent = wire_bytes(int(numel), compression, dtype_bytes=dtype_bytes, matrix_shapes=shapes,
                      powersgd_rank=powersgd_rank if compression == "powersgd" else None)
    return dp_allreduce_time_s(cluster, sent, dp, stride, "ring" if algorithm == "native" else algorithm)
