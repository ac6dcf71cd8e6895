"""Llama-style decoder: RMSNorm, SwiGLU MLP, rotary positions, grouped-query attention.

Architecture of Touvron et al. 2023 (Llama, arXiv:2302.13971 §2.2; Llama 2, arXiv:2307.09288
§2.2 for grouped-query attention, Ainslie et al. 2023). Pre-normalisation with RMSNorm (Zhang &
Sennrich 2019), SwiGLU feed-forward (Shazeer 2020, Eq. 6), rotary position embeddings (Su et al.
2021, RoFormer §3.4.2) in the half-split layout, no biases, untied embeddings by default.

Module names match :mod:`trainplan.models.gpt` where the role is the same (``wte``, ``layers``,
``attn.{q,k,v,proj}``, ``ln_1``/``ln_2``/``ln_f`` — RMSNorm here — ``lm_head``) so tensor-parallel
rules written for one apply to the other; the SwiGLU MLP is ``mlp.{gate,fc,proj}`` (``gate`` and
``fc`` column-wise, ``proj`` row-wise).

Parameter count (elements), h = hidden, f = ffn_hidden, d = h/heads, g = kv_heads, V = vocab, L =
layers: per layer ``2h^2 + 2*h*g*d + 3*h*f + 2h`` (q and o, k and v, gate/up/down, two norms); in
total ``L*(per layer) + h + V*h*(1 if tied else 2)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator
from torch import nn

from trainplan.ir.base import Strict
from trainplan.ir.facts import TransformerFacts


def llama_ffn_hidden(hidden: int, multiple_of: int, multiplier: float | None) -> int:
    """SwiGLU inner size as in Llama: ``2/3 * 4h``, times ``multiplier``, rounded up to ``multiple_of``.

    Source: Touvron et al. 2023 §2.2 ("2/3 4d instead of 4d as in PaLM") and the reference
    implementation's rounding; h=4096, multiple_of=256 gives 11008 (Llama-2-7B); h=8192,
    multiplier=1.3, multiple_of=4096 gives 28672 (Llama-2-70B). Units: elements.
    """
    inner = int(2 * (4 * hidden) / 3)
    if multiplier is not None:
        inner = int(multiplier * inner)
    return multiple_of * ((inner + multiple_of - 1) // multiple_of)


class LlamaConfig(Strict):
    layers: PositiveInt = Field(description="Transformer layers.")
    hidden: PositiveInt = Field(description="Hidden size h.")
    heads: PositiveInt = Field(description="Query heads; must divide hidden, and hidden/heads must be even (rotary).")
    kv_heads: PositiveInt | None = Field(
        None, description="Key/value heads for grouped-query attention; must divide heads (default: heads)."
    )
    vocab: PositiveInt = Field(32000, description="Vocabulary size V.")
    seq_len: PositiveInt = Field(2048, description="Maximum sequence length the model is trained for.")
    ffn_hidden: PositiveInt | None = Field(
        None, description="SwiGLU inner size (default: 2/3*4h times ffn_multiplier, rounded up to multiple_of)."
    )
    multiple_of: PositiveInt = Field(256, description="Round the default ffn_hidden up to a multiple of this.")
    ffn_multiplier: PositiveFloat | None = Field(None, description="Scale of the default ffn_hidden (1.3 in Llama-2-70B).")
    rope_theta: PositiveFloat = Field(10000.0, description="Base of the rotary frequencies.")
    norm_eps: PositiveFloat = Field(1e-5, description="RMSNorm epsilon.")
    tie_embeddings: bool = Field(False, description="Share the token embedding with the LM head.")

    @model_validator(mode="after")
    def _shapes_fit(self) -> "LlamaConfig":
        if self.hidden % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide hidden ({self.hidden})")
        if (self.hidden // self.heads) % 2:
            raise ValueError(
                f"the head size hidden/heads = {self.hidden // self.heads} must be even for rotary embeddings"
            )
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"kv_heads ({self.kv_heads}) must divide heads ({self.heads})")
        return self

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn(self) -> int:
        return self.ffn_hidden or llama_ffn_hidden(self.hidden, self.multiple_of, self.ffn_multiplier)

    def facts(self) -> TransformerFacts:
        return TransformerFacts(
            kind="decoder",
            layers=self.layers,
            hidden=self.hidden,
            heads=self.heads,
            kv_heads=self.n_kv_heads,
            ffn_hidden=self.ffn,
            vocab=self.vocab,
            seq_len=self.seq_len,
            tied_embeddings=self.tie_embeddings,
            gated_mlp=True,
            learned_positions=False,
        )


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of shape ``(seq_len, head_dim)`` for the half-split rotary layout.

    Angles ``m * theta^(-2i/d)`` for position m and pair i (RoFormer, Su et al. 2021, Eq. 15),
    in radians, computed in float32 from positions so they are exact on any device, including
    meta, and need no buffer (a meta-built model materialised with ``to_empty`` stays correct).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    positions = torch.arange(seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs ``(x_i, x_{i+d/2})`` of ``x`` (batch, heads, seq, d) by the given angles.

    RoFormer Eq. 34 with the two halves of the head as the real and imaginary parts.
    """
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class GQAttention(nn.Module):
    """Causal self-attention where ``heads/kv_heads`` query heads share each key/value head."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.group = cfg.heads // cfg.n_kv_heads
        self.theta = cfg.rope_theta
        kv_width = cfg.n_kv_heads * cfg.head_dim
        self.q = nn.Linear(cfg.hidden, cfg.hidden, bias=False)
        self.k = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.v = nn.Linear(cfg.hidden, kv_width, bias=False)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden, bias=False)

    def _share_kv(self, x: torch.Tensor) -> torch.Tensor:
        # Expand each kv head to its query group; -1 lets tensor parallelism hold heads/tp of them.
        b, g, t, d = x.shape
        return x[:, :, None].expand(b, g, self.group, t, d).reshape(b, -1, t, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(t, self.head_dim, self.theta, x.device)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, self._share_kv(k), self._share_kv(v), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """``proj(silu(gate(x)) * fc(x))`` — Shazeer 2020, Eq. 6 with Swish_1 = SiLU."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.fc = nn.Linear(cfg.hidden, cfg.ffn, bias=False)
        self.proj = nn.Linear(cfg.ffn, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(self.gate(x)) * self.fc(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.ln_1 = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.attn = GQAttention(cfg)
        self.ln_2 = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Llama(nn.Module):
    """Input: token ids ``(batch, seq)`` int64. Output: logits ``(batch, seq, vocab)``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.hidden)
        self.layers = nn.ModuleList(LlamaBlock(cfg) for _ in range(cfg.layers))
        self.ln_f = nn.RMSNorm(cfg.hidden, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def build_llama(cfg: LlamaConfig) -> Llama:
    return Llama(cfg)
