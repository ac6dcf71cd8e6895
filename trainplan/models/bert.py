"""BERT-style encoder with a masked-language-model head.

Devlin et al. 2019 (arXiv:1810.04805 §3): learned position and token-type embeddings, post-LN
transformer encoder layers (Vaswani et al. 2017 §3.1: ``LayerNorm(x + Sublayer(x))``), GELU
feed-forward, and an MLM head (dense, GELU, LayerNorm, decoder over the vocabulary tied to the
word embeddings, plus an output bias). Every sample uses token type 0 and attends to every
position (no padding mask), so ``forward`` takes token ids only.

Module names follow :mod:`trainplan.models.gpt` where the role is the same (``wte``, ``wpe``,
``layers``, ``attn.{q,k,v,proj}``, ``mlp.{fc,proj}``, ``ln_1``/``ln_2``, ``lm_head``).

Parameter count (elements), h = hidden, f = ffn_hidden, V = vocab, s = seq_len, T = type_vocab,
L = layers: embeddings ``(V + s + T)*h + 2h``; per layer ``4h^2 + 4h + 2*h*f + f + h + 4h``;
MLM head ``h^2 + h + 2h + V`` (the decoder weight is the word embedding). It equals
``BertForMaskedLM.num_parameters()`` for the same sizes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from trainplan.ir.base import Strict
from trainplan.ir.facts import TransformerFacts


class BertConfig(Strict):
    layers: PositiveInt = Field(description="Encoder layers.")
    hidden: PositiveInt = Field(description="Hidden size h.")
    heads: PositiveInt = Field(description="Attention heads; must divide hidden.")
    vocab: PositiveInt = Field(30522, description="Vocabulary size V.")
    seq_len: PositiveInt = Field(512, description="Maximum sequence length (learned positions).")
    type_vocab: PositiveInt = Field(2, description="Token types (segment embeddings).")
    ffn_hidden: PositiveInt | None = Field(None, description="Feed-forward inner size (default 4h).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")
    norm_eps: PositiveFloat = Field(1e-12, description="LayerNorm epsilon (1e-12 as in BERT).")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "BertConfig":
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        return self

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    def facts(self) -> TransformerFacts:
        return TransformerFacts(
            kind="encoder",
            layers=self.layers,
            hidden=self.hidden,
            heads=self.heads,
            kv_heads=self.heads,
            ffn_hidden=self.ffn,
            vocab=self.vocab,
            seq_len=self.seq_len,
            tied_embeddings=True,
            # The MLM head's dense + LayerNorm sit in the sequence-parallel region without a
            # tensor-parallel style; the runtime refuses that (docs/runtime.md), so never plan it.
            sequence_parallel=False,
        )


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention (no causal mask)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn)
        self.proj = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class EncoderBlock(nn.Module):
    """Post-LN: the norm follows each residual sum, as in BERT (not pre-LN as in GPT-2)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = FeedForward(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.drop(self.attn(x)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class MLMHead(nn.Module):
    """Dense + GELU + LayerNorm, then logits over the vocabulary (weight set by the owner)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln(F.gelu(self.dense(x))))


class Bert(nn.Module):
    """Input: token ids ``(batch, seq)`` int64. Output: MLM logits ``(batch, seq, vocab)``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.wtt = nn.Embedding(cfg.type_vocab, cfg.hidden)
        self.ln_e = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.layers))
        self.head = MLMHead(cfg)
        self.head.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        types = torch.zeros_like(tokens)
        x = self.wte(tokens) + self.wpe(positions) + self.wtt(types)
        x = self.drop(self.ln_e(x))
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build_bert(cfg: BertConfig) -> Bert:
    return Bert(cfg)
