"""Hugging Face ``transformers`` models built from a config only: ``model: {hf: {arch, config}}``.

GPT-2 (``GPT2LMHeadModel``), Llama (``LlamaForCausalLM``) and BERT (``BertForMaskedLM``) are
built from the config's keyword arguments, on the meta device at plan time; no weights, tokenizer
or config file is ever downloaded. The model is wrapped so ``forward(input_ids)`` returns the
logits tensor ``(batch, seq, vocab)`` (``torch.export`` then has a tensor output), and the KV
cache is off (``use_cache=False``) because training never reuses it.

``transformers`` is imported lazily: it is the optional ``hf`` extra.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from trainplan.errors import SpecError
from trainplan.ir.facts import TransformerFacts
from trainplan.ir.spec import HFModel

WHERE = "model.hf.config"


@dataclass(frozen=True)
class Arch:
    """One supported family: its classes and the config keys holding each size, as users write them."""

    config_class: str
    model_class: str
    kind: Literal["decoder", "encoder"]
    keys: dict[str, str]  # role (layers, hidden, ...) -> config key
    gated_mlp: bool
    learned_positions: bool


_COMMON = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "ffn_hidden": "intermediate_size",
    "vocab": "vocab_size",
    "seq_len": "max_position_embeddings",
}
ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        "GPT2Config",
        "GPT2LMHeadModel",
        "decoder",
        {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "ffn_hidden": "n_inner",
         "vocab": "vocab_size", "seq_len": "n_positions"},
        gated_mlp=False,
        learned_positions=True,
    ),
    "llama": Arch(
        "LlamaConfig", "LlamaForCausalLM", "decoder", {**_COMMON, "kv_heads": "num_key_value_heads"},
        gated_mlp=True, learned_positions=False,
    ),
    "bert": Arch("BertConfig", "BertForMaskedLM", "encoder", _COMMON, gated_mlp=False, learned_positions=True),
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
    if hidden % heads:
        problems.append((f"{WHERE}.{arch.keys['heads']}", f"must divide {arch.keys['hidden']} ({hidden}), got {heads}"))
    kv = _kv_heads(arch, config)
    if heads % kv:
        problems.append((f"{WHERE}.num_key_value_heads", f"must divide num_attention_heads ({heads}), got {kv}"))
    head_dim = getattr(config, "head_dim", None)
    if arch.config_class == "LlamaConfig" and head_dim not in (None, hidden // heads):
        problems.append((f"{WHERE}.head_dim", f"trainplan's cost formulas assume head_dim = hidden_size / "
                         f"num_attention_heads = {hidden // heads}; got {head_dim}, remove it or set it to that"))
    if problems:
        raise SpecError(problems)


def _kv_heads(arch: Arch, config: Any) -> int:
    if "kv_heads" in arch.keys and getattr(config, arch.keys["kv_heads"]) is not None:
        return getattr(config, arch.keys["kv_heads"])
    return _size(config, arch, "heads")


def config_facts(arch_name: str, config: Any) -> TransformerFacts:
    """Architecture facts read from a validated config."""
    arch = ARCHS[arch_name]
    hidden = _size(config, arch, "hidden")
    return TransformerFacts(
        kind=arch.kind,
        layers=_size(config, arch, "layers"),
        hidden=hidden,
        heads=_size(config, arch, "heads"),
        kv_heads=_kv_heads(arch, config),
        ffn_hidden=_size(config, arch, "ffn_hidden") or 4 * hidden,  # GPT-2: n_inner None means 4h
        vocab=_size(config, arch, "vocab"),
        seq_len=_size(config, arch, "seq_len"),
        tied_embeddings=bool(config.tie_word_embeddings),
        gated_mlp=arch.gated_mlp,
        learned_positions=arch.learned_positions,
    )


def hf_facts(hf: HFModel) -> TransformerFacts:
    return config_facts(hf.arch, hf_config(hf))


class HFLogits(nn.Module):
    """A transformers model whose ``forward(input_ids)`` returns the logits tensor only."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.hf = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids).logits


def build_hf(hf: HFModel, device: str | torch.device = "meta") -> tuple[HFLogits, TransformerFacts]:
    """Build the model from its config on ``device``; nothing is downloaded."""
    config = hf_config(hf)
    model_class = getattr(transformers_module(), ARCHS[hf.arch].model_class)
    try:
        with torch.device(device):
            model = model_class(config)
    except Exception as exc:  # a config the library accepted but cannot build
        raise SpecError([(WHERE, f"{ARCHS[hf.arch].model_class} could not be built: {_first_line(exc)}")]) from None
    return HFLogits(model), config_facts(hf.arch, config)
