"""The spec: *what* a person wants to train. Parsed from YAML by :mod:`trainplan.ir.loading`.

Every ``parallel`` field is ``"auto"`` (the planner decides) or a fixed value the planner must
honour. Unknown keys are errors everywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, NonNegativeInt, PositiveFloat, PositiveInt, field_validator, model_validator

from trainplan.ir.base import Strict
from trainplan.ir.cluster import Cluster, expand_preset

SPEC_VERSION = 1
Auto = Literal["auto"]
AUTO = "auto"


def _auto_or(check: Any, expected: str) -> Any:
    """A before-validator: ``'auto'`` passes, anything else must satisfy ``check``."""

    def validate(value: Any) -> Any:
        if value == AUTO:
            return value
        if check(value):
            return value
        raise ValueError(f"expected {expected}, got {value!r}")

    return BeforeValidator(validate)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choices(*options: str) -> str:
    return "'auto' or one of " + ", ".join(repr(o) for o in options)


def _auto_choice(*options: Any) -> Any:
    return _auto_or(lambda v: not isinstance(v, bool) and v in options, _choices(*options))


AutoPositiveInt = Annotated[
    Union[Auto, int], _auto_or(lambda v: _is_int(v) and v > 0, "'auto' or a positive integer")
]
Schedule = Literal["gpipe", "1f1b", "interleaved"]
Recompute = Literal["none", "selective", "full"]
AllReduce = Literal["native", "ring", "tree", "hierarchical", "ps"]
SyncMode = Literal["sync", "async", "local_sgd"]
Compression = Literal["none", "fp16", "bf16", "topk", "powersgd"]
Precision = Literal["fp32", "bf16", "fp16"]


class HFModel(Strict):
    arch: Literal["gpt2", "llama", "mistral", "qwen2", "bert", "t5", "vit"] = Field(
        description="Hugging Face architecture family (t5: encoder-decoder on an lm task; vit: image classification)."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the transformers config class (GPT2Config, LlamaConfig, MistralConfig, "
        "Qwen2Config, BertConfig, T5Config, ViTConfig); nothing is downloaded.",
    )


class ModelSpec(Strict):
    catalogue: str | None = Field(None, description="A catalogue model: gpt, llama, bert, mlp, cnn.")
    import_: str | None = Field(
        None,
        alias="import",
        description="'pkg.module:function' returning an nn.Module; found on the Python path or "
        "next to the spec file.",
    )
    hf: HFModel | None = Field(None, description="A Hugging Face transformers model built from config.")
    instance: str | None = Field(
        None,
        description="A model object given to trainplan.auto_parallelize in Python ('module:Class', for the "
        "record); such a plan runs only with that object, never from the spec alone.",
    )
    args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the catalogue builder or imported function."
    )
    leaf_modules: list[str] = Field(
        default_factory=list,
        description="Module class names or paths the tracer keeps whole (for code it cannot trace).",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> "ModelSpec":
        sources = (("catalogue", self.catalogue), ("import", self.import_), ("hf", self.hf), ("instance", self.instance))
        given = [k for k, v in sources if v]
        if len(given) != 1:
            got = ", ".join(given) if given else "none"
            raise ValueError(f"expected exactly one of 'catalogue', 'import' or 'hf', got {got}")
        if self.hf is not None and self.args:
            raise ValueError("'args' does not apply to 'hf' models; put settings in hf.config")
        return self

    @field_validator("import_")
    @classmethod
    def _import_path(cls, v: str | None) -> str | None:
        if v is not None and (v.count(":") != 1 or not all(v.split(":"))):
            raise ValueError(f"expected 'package.module:function', got {v!r}")
        return v


class TaskSpec(Strict):
    kind: Literal["lm", "classification", "import"] = Field(
        "lm",
        description="lm: next-token cross-entropy on synthetic tokens; classification: "
        "cross-entropy on synthetic inputs; import: a dataset from 'pkg.mod:fn'.",
    )
    vocab: PositiveInt | None = Field(None, description="lm: vocabulary size (default: the model's).")
    seq_len: PositiveInt | None = Field(None, description="lm: tokens per sample (default: the model's).")
    input_shape: list[PositiveInt] | None = Field(
        None, description="classification: shape of one sample, e.g. [3, 32, 32]."
    )
    classes: PositiveInt | None = Field(None, description="classification: number of classes.")
    import_: str | None = Field(None, alias="import", description="import: 'pkg.mod:fn' returning a dataset.")

    @model_validator(mode="after")
    def _fields_match_kind(self) -> "TaskSpec":
        allowed = {
            "lm": {"vocab", "seq_len"},
            "classification": {"input_shape", "classes"},
            "import": {"import_"},
        }[self.kind]
        for name in ("vocab", "seq_len", "input_shape", "classes", "import_"):
            if getattr(self, name) is not None and name not in allowed:
                key = "import" if name == "import_" else name
                raise ValueError(f"'{key}' does not apply to task kind {self.kind!r}")
        if self.kind == "import" and self.import_ is None:
            raise ValueError("task kind 'import' needs import: 'pkg.module:function'")
        return self


class TrainingSpec(Strict):
    global_batch: PositiveInt = Field(description="Samples per optimizer step, over all replicas.")
    precision: Precision = Field("fp32", description="fp32, or bf16/fp16 mixed precision with fp32 master weights.")
    optimizer: Literal["sgd", "adam", "adamw"] = Field("adam", description="Optimizer.")
    lr: PositiveFloat = Field(1e-3, description="Learning rate.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="Weight decay.")
    steps: PositiveInt = Field(10, description="Optimizer steps to run.")
    tokens: float | None = Field(None, gt=0, description="Optional token budget for time-to-train estimates.")
    seed: int = Field(0, description="Seed of initialisation and synthetic data.")


class CommSpec(Strict):
    """Options of the data-parallel communication and consistency modes; each has a default, so a
    spec or plan without ``comm`` keeps its meaning. Only the options of the chosen ``allreduce``,
    ``sync`` and ``compression`` are used."""

    topk_ratio: float = Field(
        0.01, gt=0, le=1,
        description="compression: topk — fraction of each gradient bucket's entries sent per step (the rest is "
        "carried to the next step as error feedback).",
    )
    powersgd_rank: PositiveInt = Field(1, description="compression: powersgd — rank of the low-rank factors P and Q.")
    local_size: PositiveInt | None = Field(
        None,
        description="allreduce: hierarchical — data-parallel ranks per node (must divide dp); null: as many as "
        "share a node of the cluster.",
    )
    ps_servers: PositiveInt | None = Field(
        None,
        description="allreduce: ps — ranks holding a shard of the parameters: co-located, the first ps_servers "
        "data-parallel ranks (null: every one); dedicated, that many extra server-only ranks (required).",
    )
    ps_placement: Literal["colocated", "dedicated"] = Field(
        "colocated",
        description="allreduce: ps — colocated: server threads on worker ranks; dedicated: ps_servers extra ranks "
        "after the mesh that only serve (the job runs mesh world size + ps_servers processes).",
    )
    staleness: NonNegativeInt = Field(
        0,
        description="sync: async (parameter server) — staleness bound s: a worker more than s pushes ahead of the "
        "slowest waits; 0 is synchronous.",
    )
    local_sgd_period: PositiveInt = Field(
        4, description="sync: local_sgd — replicas step alone and average their parameters every H steps."
    )
    local_sgd_warmup: NonNegativeInt = Field(
        0, description="sync: local_sgd — synchronous (gradient-averaging) steps before local steps begin."
    )

    @model_validator(mode="after")
    def _dedicated_servers_counted(self) -> "CommSpec":
        if self.ps_placement == "dedicated" and self.ps_servers is None:
            raise ValueError("ps_placement: dedicated needs ps_servers, the number of server-only ranks to add")
        return self


class ParallelSpec(Strict):
    dp: AutoPositiveInt = Field(AUTO, description="Data-parallel degree.")
    tp: AutoPositiveInt = Field(AUTO, description="Tensor-parallel degree (Megatron-style).")
    pp: AutoPositiveInt = Field(AUTO, description="Pipeline-parallel degree (stages).")
    micro_batch: AutoPositiveInt = Field(AUTO, description="Samples per micro-batch per replica.")
    schedule: Annotated[Union[Auto, Schedule], _auto_choice("gpipe", "1f1b", "interleaved")] = Field(
        AUTO, description="Pipeline schedule."
    )
    virtual_stages: AutoPositiveInt = Field(AUTO, description="Model chunks per pipeline rank (interleaved).")
    zero: Annotated[Union[Auto, int], _auto_choice(0, 1, 2, 3)] = Field(
        AUTO, description="ZeRO stage: 0 none, 1 optimizer states, 2 + gradients, 3 + parameters."
    )
    recompute: Annotated[Union[Auto, Recompute], _auto_choice("none", "selective", "full")] = Field(
        AUTO, description="Activation recomputation."
    )
    sequence_parallel: Annotated[Union[Auto, bool], _auto_or(lambda v: isinstance(v, bool), "'auto', true or false")] = Field(
        AUTO, description="Shard LayerNorm/dropout activations along the sequence in TP groups."
    )
    allreduce: Annotated[Union[Auto, AllReduce], _auto_choice("native", "ring", "tree", "hierarchical", "ps")] = Field(
        AUTO, description="Gradient all-reduce algorithm for data-parallel groups."
    )
    sync: Annotated[Union[Auto, SyncMode], _auto_choice("sync", "async", "local_sgd")] = Field(
        AUTO, description="Consistency mode of data-parallel replicas."
    )
    compression: Annotated[Union[Auto, Compression], _auto_choice("none", "fp16", "bf16", "topk", "powersgd")] = Field(
        AUTO, description="Gradient compression."
    )
    comm: CommSpec = Field(
        default_factory=CommSpec,
        description="Options of the chosen all-reduce, consistency mode and compression (topk ratio, PowerSGD "
        "rank, ranks per node, parameter servers, staleness, local-SGD period).",
    )

    def fixed(self) -> dict[str, Any]:
        """The fields the user fixed (not 'auto')."""
        return {k: v for k, v in self.model_dump(exclude={"comm"}).items() if v != AUTO}

    def dedicated_ps_servers(self) -> int:
        """Server-only ranks the spec asks for (``allreduce: ps``, ``comm.ps_placement: dedicated``), else 0."""
        if self.allreduce == "ps" and self.comm.ps_placement == "dedicated":
            return self.comm.ps_servers or 0
        return 0


class Spec(Strict):
    version: Literal[1] = Field(SPEC_VERSION, description="Spec format version.")
    name: str = Field(description="A name for the run; used in reports and as the default output folder name.")
    model: ModelSpec = Field(description="What to train: a catalogue model, an import path or a Hugging Face config.")
    task: TaskSpec = Field(default_factory=TaskSpec, description="The loss and the data (synthetic by default).")
    training: TrainingSpec = Field(description="Batch, precision, optimizer, steps and seed.")
    cluster: Cluster = Field(
        description="{preset: NAME, nodes: N, ...overrides} or a whole description (see docs/spec-reference.md)."
    )
    parallel: ParallelSpec = Field(
        default_factory=ParallelSpec, description="Parallel layout; omitted fields are 'auto' (searched)."
    )
    objective: Literal["throughput"] = Field(
        "throughput", description="throughput: the fastest plan that fits (the only objective so far)."
    )

    @field_validator("cluster", mode="before")
    @classmethod
    def _expand_cluster_preset(cls, raw: Any) -> Any:
        return expand_preset(raw)

    @field_validator("name")
    @classmethod
    def _safe_folder_name(cls, v: str) -> str:
        if not v.strip() or "/" in v or "\\" in v or v.startswith("."):
            raise ValueError(f"expected a name usable as a folder name (no '/', '\\', no leading '.'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _device_runs_the_precision(self) -> "Spec":
        try:
            self.cluster.device.peak(self.training.precision)
        except KeyError:
            have = ", ".join(self.cluster.device.peak_flops)
            raise ValueError(
                f"cluster.device.peak_flops has no rate for training.precision {self.training.precision!r} "
                f"(it lists {have}); add one or change the precision"
            ) from None
        return self
