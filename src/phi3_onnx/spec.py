"""Model spec: the typed description of a Phi-3 checkpoint that every stage reads.

A `ModelSpec` is pure data. The exporter builds it from a checkpoint's config.json
(`phi3_onnx.checkpoint.spec_from_config`); the package manifest stores it with
`to_dict()`, and the runtime reads it back with `from_dict()` without importing the exporter.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LongRope:
    """Phi-3 LongRoPE ("su"/"longrope") scaling: short factors up to the original context, long past it."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    attention_factor: float  # multiplies cos/sin; transformers' default is sqrt(1 + ln(s)/ln(orig))
    # Phi-3.5-MoE: long_mscale scales the long rows (attention_factor = short_mscale the short ones); None: the same
    long_attention_factor: float | None = None

    @property
    def long_scale(self) -> float:
        return self.attention_factor if self.long_attention_factor is None else self.long_attention_factor


@dataclass(frozen=True)
class MoeSpec:
    """Phi-3.5-MoE's sparse MLP: `num_experts` SwiGLU experts, `top_k` of them per token, chosen by sparsemixer."""

    num_experts: int
    top_k: int
    router_jitter_eps: float  # sparsemixer's threshold: experts within 2*eps (relative) of the max stay in its softmax


@dataclass(frozen=True)
class SmallSpec:
    """Phi-3-small (Phi3SmallForCausalLM) specifics: block-sparse attention layout, gegelu, muP multipliers.

    A layer is dense when dense_every divides layer + 1 (0: every layer block-sparse); the others see,
    per query block, the `local_blocks` latest key blocks and every key block b with
    (b + head * head_step + 1) % vert_stride == 0 (head_step 0 when the pattern is homogeneous).
    """

    block_size: int
    local_blocks: int
    vert_stride: int
    homo_head_pattern: bool
    dense_every: int
    gegelu_limit: float | None
    embedding_multiplier: float  # hidden = embedding * m (m <= 0: no scaling, as the reference)
    width_multiplier: float  # logits = lm_head(x) / m
    attention_scale: float  # softmax scale: mup_attn_multiplier / head_dim, or 1/sqrt(head_dim)
    dummy_token_ids: tuple[int, ...] = ()  # logits forced to the dtype's minimum (unused vocabulary rows)

    def is_dense(self, layer: int) -> bool:
        return bool(self.dense_every) and (layer + 1) % self.dense_every == 0

    def has_sparse_layer(self, num_layers: int) -> bool:
        return not all(self.is_dense(i) for i in range(num_layers))

    def head_step(self, num_heads: int) -> int:
        return 0 if self.homo_head_pattern else max(1, int(self.vert_stride / num_heads))


# fields added after the first manifests were written: omitted from to_dict() at their defaults,
# so packages of models without them keep byte-identical manifests
_LATER_FIELDS = {"architecture": "Phi3ForCausalLM", "norm": "rms", "attention_bias": False, "lm_head_bias": False,
                 "moe": None, "small": None}


@dataclass(frozen=True)
class ModelSpec:
    """Architecture hyper-parameters of one Phi-3 model (no weights)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    max_position_embeddings: int
    original_max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    sliding_window: int | None = None
    longrope: LongRope | None = None
    partial_rotary_factor: float = 1.0  # Phi-4-mini: 0.75, rotary on the first 96 of 128 head dims
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (32000,)
    pad_token_id: int = 32000
    name: str = "phi3"
    architecture: str = "Phi3ForCausalLM"
    norm: str = "rms"  # "rms" (RMSNorm, Phi-3) | "layer" (LayerNorm with bias: Phi-3.5-MoE, Phi-3-small); eps is rms_norm_eps
    attention_bias: bool = False  # q/k/v/o projections carry biases (Phi-3-small: the MLP's linears too)
    lm_head_bias: bool = False
    moe: MoeSpec | None = None  # the MLP is a mixture of experts (Phi-3.5-MoE)
    small: SmallSpec | None = None  # Phi-3-small's block-sparse attention, gegelu and muP

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dim(self) -> int:
        """Head dims that rotary embeddings turn (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def qkv_dim(self) -> int:
        return self.hidden_size + 2 * self.kv_dim

    def with_context(self, tokens: int) -> ModelSpec:
        """This model served with a shorter context (a package's `--context-length`).

        Only the context shrinks: LongRoPE's factors and attention scaling stay as published. When
        the context fits inside the sliding window, `attention_window` becomes None, so the graph
        needs no window: exact, since no query can then see past it.
        """
        if not 0 < tokens <= self.max_position_embeddings:
            raise ValueError(f"context length must be in 1..{self.max_position_embeddings}, got {tokens}")
        return dataclasses.replace(self, max_position_embeddings=tokens)

    @property
    def attention_window(self) -> int | None:
        """Keys a query may see (itself included), or None when the window covers the whole context."""
        if self.sliding_window is None or self.sliding_window >= self.max_position_embeddings:
            return None
        return self.sliding_window

    def num_params(self) -> int:
        experts = 1 if self.moe is None else self.moe.num_experts
        router = 0 if self.moe is None else self.moe.num_experts * self.hidden_size
        norms = 2 if self.norm == "rms" else 4  # LayerNorm has a bias too
        per_layer = (
            self.hidden_size * self.qkv_dim
            + self.hidden_size * self.hidden_size
            + experts * 3 * self.intermediate_size * self.hidden_size
            + router
            + norms * self.hidden_size
            + (self.qkv_dim + self.hidden_size if self.attention_bias else 0)
        )
        if self.small is not None and self.attention_bias:  # Phi-3-small's up_proj and down_proj biases
            per_layer += 2 * self.intermediate_size + self.hidden_size
        head = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size + (self.vocab_size if self.lm_head_bias else 0)
        final_norm = self.hidden_size * (1 if self.norm == "rms" else 2)
        return self.vocab_size * self.hidden_size + self.num_layers * per_layer + final_norm + head

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, default in _LATER_FIELDS.items():
            if data[key] == default:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        rope = data.pop("longrope", None)
        if rope is not None:
            rope = LongRope(
                short_factor=tuple(rope["short_factor"]),
                long_factor=tuple(rope["long_factor"]),
                attention_factor=float(rope["attention_factor"]),
                long_attention_factor=None if rope.get("long_attention_factor") is None else float(rope["long_attention_factor"]),
            )
        moe = data.pop("moe", None)
        if moe is not None:
            data["moe"] = MoeSpec(int(moe["num_experts"]), int(moe["top_k"]), float(moe["router_jitter_eps"]))
        data["eos_token_ids"] = tuple(data.get("eos_token_ids", ()))
        small = data.pop("small", None)
        if small is not None:
            data["small"] = SmallSpec(**{**small, "dummy_token_ids": tuple(small.get("dummy_token_ids", ()))})
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(longrope=rope, **{k: v for k, v in data.items() if k in known})


__all__ = ["LongRope", "ModelSpec", "MoeSpec", "SmallSpec"]
