"""Architecture facts a model declares about itself, for closed-form costs.

The graph front end measures everything it can from the traced graph; a transformer additionally
declares its shape so the cost model can use the published per-layer formulas (Korthikanti et al.
2022 activations, Megatron-LM Eq. 2/3 parameters and FLOPs) and tensor-parallel sharding rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class TransformerFacts:
    """Shape of a stack of identical transformer layers.

    Units: counts (layers, heads, ...) and elements (hidden, ffn_hidden, vocab, seq_len).
    """

    kind: Literal["decoder", "encoder"]
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    vocab: int  # the head's output features: the vocabulary, or a classifier's classes (Hugging Face ViT)
    seq_len: int  # tokens per sample (ViT: patches + [CLS])
    tied_embeddings: bool
    gated_mlp: bool = False
    learned_positions: bool = True
    # False when the layers have no Megatron-style sharding the runtime can apply (a model that
    # declares so): the planner then keeps tp = 1.
    tensor_parallel: bool = True
    # False when the runtime cannot keep the residual stream split along the sequence (Hugging Face
    # layers pass the hidden states to their attention by keyword): the planner never picks it.
    sequence_parallel: bool = True
