"""GPT-2/3 style decoder: learned positions, pre-LayerNorm, GELU MLP, tied embeddings.

Layout follows Radford et al. 2019 (GPT-2) and Brown et al. 2020 (GPT-3); module names follow
torchtitan's convention of separate q/k/v projections so tensor parallelism can shard heads
column-wise. Parameter count with the final LayerNorm: Megatron-LM Eq. 2 (Narayanan et al. 2021)
``12*l*h^2*(1 + 13/(12h) + (V+s)/(12*l*h))`` plus ``2h`` for ``ln_f``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt, model_validator
from torch import nn

from trainplan.ir.base import Strict
from trainplan.ir.facts import TransformerFacts


class GPTConfig(Strict):
    layers: PositiveInt = Field(description="Transformer layers.")
    hidden: PositiveInt = Field(description="Hidden size h.")
    heads: PositiveInt = Field(description="Attention heads; must divide hidden.")
    vocab: PositiveInt = Field(50257, description="Vocabulary size V.")
    seq_len: PositiveInt = Field(1024, description="Maximum sequence length s (learned positions).")
    ffn_hidden: PositiveInt | None = Field(None, description="MLP inner size (default 4h).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout probability.")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the LM head.")
    norm_eps: float = Field(1e-5, gt=0, description="LayerNorm epsilon.")

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "GPTConfig":
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        return self

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.hidden

    def facts(self) -> TransformerFacts:
        return TransformerFacts(
            kind="decoder",
            layers=self.layers,
            hidden=self.hidden,
            heads=self.heads,
            kv_heads=self.heads,
            ffn_hidden=self.ffn,
            vocab=self.vocab,
            seq_len=self.seq_len,
            tied_embeddings=self.tie_embeddings,
        )


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.hidden // cfg.heads
        self.q = nn.Linear(cfg.hidden, cfg.hidden)
        self.k = nn.Linear(cfg.hidden, cfg.hidden)
        self.v = nn.Linear(cfg.hidden, cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds heads/tp of them.
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.hidden, cfg.ffn)
        self.proj = nn.Linear(cfg.ffn, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln_1(x)))
        return x + self.drop(self.mlp(self.ln_2(x)))


class GPT(nn.Module):
    """Input: token ids ``(batch, seq)`` int64. Output: logits ``(batch, seq, vocab)``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.wte(tokens) + self.wpe(positions))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def build_gpt(cfg: GPTConfig) -> GPT:
    return GPT(cfg)
