"""Hugging Face ``transformers`` models built from a config only: ``model: {hf: {arch, config}}``.

Supported families (``ARCHS``), each built from the config's keyword arguments on the meta
device at plan time; no weights, tokenizer or config file is ever downloaded:

=========  ==============================  ==============  ===========================================
arch       transformers class              task            forward of the wrapper
=========  ==============================  ==============  ===========================================
gpt2       ``GPT2LMHeadModel``             lm              ``wte + wpe`` → blocks ``h.*`` → ``ln_f`` → head
llama      ``LlamaForCausalLM``            lm              embeddings → rotary angles → ``layers.*`` → norm → head
mistral    ``MistralForCausalLM``          lm              as llama (sequences up to ``sliding_window``)
qwen2      ``Qwen2ForCausalLM``            lm              as llama
bert       ``BertForMaskedLM``             lm              embeddings → ``encoder.layer.*`` → MLM head
t5         ``T5ForConditionalGeneration``  lm (seq2seq)    the model's own forward, see :class:`HFSeq2SeqLM`
vit        ``ViTForImageClassification``   classification  patch embeddings → ``layers.*`` → norm → classifier on [CLS]
=========  ==============================  ==============  ===========================================

The wrappers' ``forward`` calls the model's own sub-modules (its embeddings, decoder layers,
norms and heads) in the order the model's own ``forward`` does, so ``torch.fx`` can trace it
with those sub-modules kept whole — which is what cuts pipeline stages — while the code inside
each sub-module stays the library's. Attention runs with ``sdpa`` and no mask: causal for the
decoders (``is_causal``), bidirectional for BERT and ViT, which equals the library's forward
without padding (tested: :func:`trainplan.models.hf.library_forward`). The KV cache is off.

Buffers (rotary inverse frequencies, BERT's position and token-type ids) are not parameters: a
model built on meta has no values for them, so their values are computed at build time on the
CPU by the library's own initialiser (``_init_weights``, which transformers uses when it loads
a model from the meta device) and attached to the module that owns them
(:func:`trainplan.models.init.set_buffer_values`); the runtime copies them back after
allocating the rank's stage. Nothing of the model's parameters is allocated for that.

``transformers`` is imported lazily: it is the optional ``hf`` extra.
"""

from __future__ import annotations

import copy
import difflib
import importlib
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from trainplan.errors import SpecError
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.spec import HFModel
from trainplan.models.init import set_buffer_values

WHERE = "model.hf.config"

Forward = Literal["gpt2", "rotary", "bert", "t5", "vit"]


@dataclass(frozen=True)
class Arch:
    """One supported family: its classes, forward, and the config keys holding each size."""

    config_class: str
    model_class: str
    forward: Forward
    task: Literal["lm", "classification"]
    keys: dict[str, str]  # role (layers, hidden, ...) -> config key
    # Closed-form transformer facts (TransformerFacts) describe a stack of identical layers: a
    # decoder or encoder with a vocabulary, or ViT's encoder over patch tokens (its head's outputs
    # are the classes). Encoder-decoders are measured from their graph instead (no facts).
    facts_kind: Literal["decoder", "encoder"] | None = None
    gated_mlp: bool = False
    learned_positions: bool = True
    # Whether the planner's HF_TP_STYLES give this family a Megatron-style split (column-parallel
    # q/k/v and MLP-up, row-parallel attention output and MLP-down); T5 has none (tp stays 1).
    tensor_parallel: bool = True
    head_dim_key: str | None = None  # a config key that may set head_dim independently
    defaults: dict[str, Any] = field(default_factory=dict)  # sizes the config does not hold


_COMMON = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "ffn_hidden": "intermediate_size",
    "vocab": "vocab_size",
    "seq_len": "max_position_embeddings",
}
_ROTARY = {**_COMMON, "kv_heads": "num_key_value_heads"}
ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        "GPT2Config", "GPT2LMHeadModel", "gpt2", "lm",
        {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn_hidden": "n_inner",
         "vocab": "vocab_size", "seq_len": "n_positions"},
        facts_kind="decoder",
    ),
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", "rotary", "lm", _ROTARY, facts_kind="decoder",
                  gated_mlp=True, learned_positions=False, head_dim_key="head_dim"),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", "rotary", "lm", _ROTARY, facts_kind="decoder",
                    gated_mlp=True, learned_positions=False, head_dim_key="head_dim"),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", "rotary", "lm", _ROTARY, facts_kind="decoder",
                  gated_mlp=True, learned_positions=False, head_dim_key="head_dim"),
    "bert": Arch("BertConfig", "BertForMaskedLM", "bert", "lm", _COMMON, facts_kind="encoder"),
    # T5 has relative positions (no length limit); lm tasks default to its pre-training length.
    "t5": Arch(
        "T5Config", "T5ForConditionalGeneration", "t5", "lm",
        {"layers": "num_layers", "hidden": "d_model", "heads": "num_heads", "ffn_hidden": "d_ff",
         "vocab": "vocab_size"},
        tensor_parallel=False, defaults={"seq_len": 512},
    ),
    "vit": Arch(
        "ViTConfig", "ViTForImageClassification", "vit", "classification",
        {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
         "ffn_hidden": "intermediate_size", "image_size": "image_size", "patch_size": "patch_size",
         "channels": "num_channels", "classes": "num_labels"},
        facts_kind="encoder",
    ),
}


def transformers_module() -> Any:
    """``transformers``, or a SpecError saying how to install it."""
    try:
        return importlib.import_module("transformers")
    except ImportError as exc:
        raise SpecError([("model.hf", f"Hugging Face models need the 'transformers' package ({exc}); "
                          "install the hf extra: pip install 'trainplan[hf]'")]) from None


def hf_config(hf: HFModel) -> Any:
    """The transformers config object of ``hf``, validated; errors under ``model.hf.config``."""
    arch = ARCHS[hf.arch]
    config_class = getattr(transformers_module(), arch.config_class)
    kwargs = {**hf.config, "use_cache": False}
    try:
        config = config_class(**kwargs)
    except Exception as exc:  # the library's own validation; its message names the field
        raise SpecError([(_field_path(str(exc)), _first_line(exc))]) from None
    _refuse_unknown_keys(config_class, config, hf.config)
    _check_sizes(arch, config)
    # The wrappers call attention without a mask (causal via sdpa's is_causal); eager attention
    # would need an explicit mask.
    config._attn_implementation = "sdpa"
    return config


def _first_line(exc: Exception) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _field_path(message: str) -> str:
    m = re.search(r"field '(\w+)'", message)
    return f"{WHERE}.{m.group(1)}" if m else WHERE


def _refuse_unknown_keys(config_class: Any, config: Any, given: dict[str, Any]) -> None:
    """Config classes store any unknown keyword as an attribute; a typo would pass silently.

    A key is unknown when the class neither declares it (default config, ``__init__`` parameters,
    ``attribute_map`` aliases) nor consumes it (legacy keys like ``rope_theta`` are folded into
    other fields and do not appear in ``to_dict()``).
    """
    declared = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
    declared |= set(inspect.signature(config_class.__init__).parameters)
    stored = set(config.to_dict())
    problems = []
    for key in sorted(given):
        if key not in declared and key in stored:
            close = difflib.get_close_matches(key, sorted(declared), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            problems.append((f"{WHERE}.{key}", f"unknown key {key!r} for {config_class.__name__}{hint}"))
    if problems:
        raise SpecError(problems)


def _size(config: Any, arch: Arch, role: str) -> Any:
    if role not in arch.keys:
        return arch.defaults.get(role)
    return getattr(config, arch.keys[role])


def _check_sizes(arch: Arch, config: Any) -> None:
    problems = []
    for role, key in arch.keys.items():
        value = getattr(config, key)
        if value is None and role in ("ffn_hidden", "kv_heads"):
            continue  # defaulted from other sizes
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            problems.append((f"{WHERE}.{key}", f"expected a positive integer, got {value!r}"))
    if problems:
        raise SpecError(problems)
    hidden, heads = _size(config, arch, "hidden"), _size(config, arch, "heads")
    if arch.forward != "t5" and hidden % heads:  # T5 sets its head size (d_kv) independently
        problems.append((f"{WHERE}.{arch.keys['heads']}", f"must divide {arch.keys['hidden']} ({hidden}), got {heads}"))
    kv = _kv_heads(arch, config)
    if heads % kv:
        problems.append((f"{WHERE}.num_key_value_heads", f"must divide num_attention_heads ({heads}), got {kv}"))
    head_dim = getattr(config, arch.head_dim_key, None) if arch.head_dim_key else None
    if head_dim not in (None, hidden // heads):
        problems.append((f"{WHERE}.head_dim", f"trainplan's cost formulas assume head_dim = hidden_size / "
                         f"num_attention_heads = {hidden // heads}; got {head_dim}, remove it or set it to that"))
    if arch.forward == "vit" and config.image_size % config.patch_size:
        problems.append((f"{WHERE}.patch_size", f"must divide image_size ({config.image_size}), got {config.patch_size}"))
    if problems:
        raise SpecError(problems)


def _kv_heads(arch: Arch, config: Any) -> int:
    if "kv_heads" in arch.keys and getattr(config, arch.keys["kv_heads"]) is not None:
        return getattr(config, arch.keys["kv_heads"])
    return _size(config, arch, "heads")


def max_sequence(arch: Arch, config: Any) -> int:
    """The longest sequence the wrapper computes exactly as the library does.

    Mistral (and Qwen2 with ``use_sliding_window``) restrict attention to a window; the wrapper
    runs full causal attention, which is the same only for sequences up to the window.
    """
    longest = _size(config, arch, "seq_len")
    window = getattr(config, "sliding_window", None)
    if arch.forward == "rotary" and window is not None and getattr(config, "use_sliding_window", True) is not False:
        longest = min(longest, window)
    return longest


def config_facts(arch_name: str, config: Any) -> TransformerFacts | None:
    """Closed-form transformer facts read from a validated config (None: measured from the graph)."""
    arch = ARCHS[arch_name]
    if arch.facts_kind is None:
        return None
    hidden = _size(config, arch, "hidden")
    if arch.task == "classification":  # ViT: a [CLS] token and one token per patch; the head's outputs are the classes
        outputs, tokens = _size(config, arch, "classes"), (config.image_size // config.patch_size) ** 2 + 1
    else:
        outputs, tokens = _size(config, arch, "vocab"), max_sequence(arch, config)
    return TransformerFacts(
        kind=arch.facts_kind,
        layers=_size(config, arch, "layers"),
        hidden=hidden,
        heads=_size(config, arch, "heads"),
        kv_heads=_kv_heads(arch, config),
        ffn_hidden=_size(config, arch, "ffn_hidden") or 4 * hidden,  # GPT-2: n_inner None means 4h
        vocab=outputs,
        seq_len=tokens,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),  # ViT has no token embedding
        gated_mlp=arch.gated_mlp,
        learned_positions=arch.learned_positions,
        tensor_parallel=arch.tensor_parallel,
        sequence_parallel=False,  # the layers hand the hidden states to their attention by keyword
    )


def hf_facts(hf: HFModel) -> TransformerFacts | None:
    return config_facts(hf.arch, hf_config(hf))


@dataclass(frozen=True)
class HFTask:
    """What a Hugging Face model consumes: an lm task's sizes, or an image classifier's."""

    kind: Literal["lm", "classification"]
    vocab: int | None = None
    seq_len: int | None = None
    sample_shape: list[int] | None = None  # classification: (channels, height, width)
    classes: int | None = None
    limited: bool = True  # seq_len is the longest sequence (False: only a default, e.g. T5's relative positions)

    def input_problem(self, shape: list[int]) -> str | None:
        if shape != self.sample_shape:
            return f"the model takes images of shape {self.sample_shape} (num_channels, image_size, image_size), got {shape}"
        return None


def hf_task(hf: HFModel) -> HFTask:
    """The task sizes of ``hf``'s model (validated config)."""
    arch, config = ARCHS[hf.arch], hf_config(hf)
    if arch.task == "classification":
        side = config.image_size
        return HFTask("classification", sample_shape=[config.num_channels, side, side], classes=config.num_labels)
    return HFTask("lm", vocab=_size(config, arch, "vocab"), seq_len=max_sequence(arch, config),
                  limited="seq_len" in arch.keys)


class HFWrapper(nn.Module):
    """A transformers model under ``self.hf`` whose ``forward`` returns one logits tensor."""

    # The runtime's sequence parallelism gathers a sub-module's positional input; transformers'
    # layers call their attention with ``hidden_states=`` (a keyword), so it cannot be applied.
    supports_sequence_parallel = False

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model


class HFGPT2LM(HFWrapper):
    """GPT-2: token + learned position embeddings, blocks, final norm, (tied) head."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        body = self.hf.transformer
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        hidden = body.drop(body.wte(input_ids) + body.wpe(positions))
        for block in body.h:
            hidden = block(hidden)
        return self.hf.lm_head(body.ln_f(hidden))


class HFRotaryLM(HFWrapper):
    """Llama, Mistral, Qwen2: embeddings, rotary angles, decoder layers, norm, head.

    The rotary ``(cos, sin)`` pair travels as one stacked tensor (a pipeline stage boundary
    passes tensors); the layers unpack it with ``cos, sin = position_embeddings`` as before.
    """

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        body = self.hf.model
        hidden = body.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        rope = torch.stack(body.rotary_emb(hidden, positions))
        for layer in body.layers:
            hidden = layer(hidden, position_embeddings=rope)
        return self.hf.lm_head(body.norm(hidden))


class HFBertMLM(HFWrapper):
    """BERT masked-LM model used as a token predictor: embeddings, encoder layers, MLM head."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        # The MLM head registers its output bias twice (``predictions.bias`` is
        # ``predictions.decoder.bias``, for old checkpoints); only the decoder uses it. One name
        # lets tensor parallelism shard it with the decoder (the count is unchanged).
        head = model.cls.predictions
        if head._parameters.get("bias") is head.decoder.bias:
            del head._parameters["bias"]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        body = self.hf.bert
        hidden = body.embeddings(input_ids=input_ids)
        for layer in body.encoder.layer:
            hidden = layer(hidden)
        return self.hf.cls(hidden)


class HFSeq2SeqLM(HFWrapper):
    """T5 on an lm task: the encoder reads the tokens, the decoder predicts each next token.

    The lm task's targets are the inputs shifted by one, so teacher forcing feeds the decoder
    ``decoder_input_ids`` = the input tokens (the targets shifted right, with the true first
    token where T5 would put its start token). Runs the library's forward, which ``torch.fx``
    cannot trace: T5 runs without pipeline stages.
    """

    # Read by the graph front end: the whole model is one unit, so the planner never cuts it.
    keep_whole = {"hf": "T5's decoder cross-attends to the encoder's output in every layer and its forward "
                        "cannot be traced by torch.fx, so it is not cut into pipeline stages; "
                        "its attention has no tensor-parallel rule (heads are reshaped by their configured count)"}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, decoder_input_ids=input_ids).logits


class HFViTClassifier(HFWrapper):
    """ViT image classifier: patch embeddings, encoder layers, norm, classifier on the [CLS] token."""

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        body = self.hf.vit
        hidden = body.embeddings(pixel_values)
        for layer in body.layers:
            hidden = layer(hidden)
        return self.hf.classifier(body.layernorm(hidden)[:, 0, :])


WRAPPERS: dict[Forward, type[HFWrapper]] = {
    "gpt2": HFGPT2LM, "rotary": HFRotaryLM, "bert": HFBertMLM, "t5": HFSeq2SeqLM, "vit": HFViTClassifier,
}


def library_forward(wrapper: HFWrapper, inputs: torch.Tensor) -> torch.Tensor:
    """The library's own forward of the wrapped model (for checking the wrappers)."""
    if isinstance(wrapper, HFViTClassifier):
        return wrapper.hf(pixel_values=inputs).logits
    if isinstance(wrapper, HFSeq2SeqLM):
        return wrapper.hf(input_ids=inputs, decoder_input_ids=inputs).logits
    return wrapper.hf(input_ids=inputs).logits


def build_hf(hf: HFModel, device: str | torch.device = "meta") -> tuple[HFWrapper, TransformerFacts | None]:
    """Build the model from its config on ``device``; nothing is downloaded."""
    config = hf_config(hf)
    arch = ARCHS[hf.arch]
    model_class = getattr(transformers_module(), arch.model_class)
    try:
        with torch.device(device):
            model = model_class(config)
    except Exception as exc:  # a config the library accepted but cannot build
        raise SpecError([(WHERE, f"{arch.model_class} could not be built: {_first_line(exc)}")]) from None
    attach_buffer_values(model)
    return WRAPPERS[arch.forward](model), config_facts(hf.arch, config)


def attach_buffer_values(model: nn.Module) -> None:
    """Give every buffer-owning sub-module the values of its buffers (see the module docstring).

    Computed on a parameterless CPU stand-in of the owner (same class and attributes, buffers
    filled with a sentinel) by the model's own ``_init_weights``; a buffer the initialiser does
    not write keeps no value and the runtime refuses the model, naming it.
    """
    init_weights = getattr(model, "_init_weights", None)
    for _, owner in model.named_modules():
        buffers = dict(owner.named_buffers(recurse=False))
        if not buffers or isinstance(owner, _NormBase):
            continue
        if all(not b.is_meta for b in buffers.values()):
            set_buffer_values(owner, {n: b.detach().to("cpu", copy=True) for n, b in buffers.items()})
            continue
        if init_weights is None:
            continue
        stand_in = copy.copy(owner)
        stand_in._parameters, stand_in._modules = {}, {}
        stand_in._buffers = {n: _sentinel(b) for n, b in buffers.items()}
        with torch.no_grad():
            init_weights(stand_in)
        written = {n: v for n, v in stand_in._buffers.items() if v is not None and not _is_sentinel(v)}
        set_buffer_values(owner, written)


def _sentinel(buffer: torch.Tensor) -> torch.Tensor:
    value = float("nan") if buffer.is_floating_point() else torch.iinfo(buffer.dtype).min
    return torch.full(buffer.shape, value, dtype=buffer.dtype, device="cpu")


def _is_sentinel(value: torch.Tensor) -> bool:
    if value.is_floating_point():
        return bool(torch.isnan(value).any())
    return bool((value == torch.iinfo(value.dtype).min).any())
