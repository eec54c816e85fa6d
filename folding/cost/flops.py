"""FLOPs per training iteration, in Megatron's convention and in other labelled conventions.

The default, ``megatron``, equals ``megatron.training.training.num_floating_point_operations``
for full-length (unpacked) sequences, as an exact integer: every GEMM counts 2 FLOPs per
multiply-add and runs three times (forward, weight gradient, input gradient); core attention is
halved for the causal mask; the logits GEMM is counted (once per MTP head too); the embedding
lookup, the router, norms and element-wise work are not; activation recomputation is not
counted (it is work, not model FLOPs). MoE layers count ``moe_router_topk`` routed experts plus
the shared experts per token. MLA and MTP follow Megatron's formulas term for term, including
its small norm terms.

Other conventions differ in stated ways only (``CONVENTIONS`` holds the labels printed next to
every figure).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Dict

from folding.errors import FoldingError
from folding.layout.parameters import ParameterModel, padded_vocab_size
from folding.recipe import ModelArch

CONVENTIONS: Dict[str, str] = {
    "megatron": "Megatron-LM (num_floating_point_operations): 6 FLOPs per multiply-add over "
                "fwd+bwd, causal attention halved, logits counted, router not counted",
    "full-attention": "Megatron-LM, but core attention not halved for the causal mask",
    "router": "Megatron-LM plus the router GEMM (6 x hidden x experts per token per MoE layer)",
    "palm": "PaLM (6N + 12LHQT per token): N = active parameters without the input embedding, "
            "attention not halved",
}

# Each GEMM runs forward, backward for the weight gradient and backward for the input gradient;
# a multiply-add is two FLOPs.
FWD_BWD_FMA = 3 * 2


@dataclass(frozen=True)
class LayerFlops:
    """Training FLOPs per token of one layer of each kind, in Megatron's convention."""

    attention_linear: int
    """QKV (or MLA low-rank) and output projections of one attention layer."""
    attention_core_per_position: int
    """QK^T and softmax-times-V, per token per key position (Megatron halves it for causality:
    multiply by the sequence length for one full-length sequence)."""
    dense_mlp: int
    """One dense MLP."""
    routed_experts: int
    """The top-k routed experts of one MoE layer."""
    shared_experts: int
    """The shared experts of one MoE layer."""
    router: int
    """The router GEMM of one MoE layer (not counted by Megatron)."""
    mtp_projection: int
    """Norms and the 2h -> h projection of one MTP layer (Megatron's terms)."""
    logits: int
    """One output head."""


@dataclass(frozen=True)
class FlopsTerms:
    """FLOPs of one training iteration, by component (integers)."""

    attention_linear: int = 0
    attention_core: int = 0
    dense_mlp: int = 0
    routed_experts: int = 0
    shared_experts: int = 0
    router: int = 0
    mtp_projection: int = 0
    logits: int = 0
    parameters: int = 0
    """The 6N term of the PaLM convention (zero otherwise)."""

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class LayerCounts:
    """How many layers of each kind one forward pass runs (MTP layers included)."""

    attention: int
    dense_mlp: int
    moe: int
    mtp: int


def layer_counts(arch: ModelArch) -> LayerCounts:
    """Megatron's counting: MTP layers are transformer layers of the same MLP type as the last
    decoder layer."""
    pattern = arch.moe_layer_pattern()
    mtp = arch.mtp_num_layers or 0
    moe = sum(pattern) + pattern[-1] * mtp
    return LayerCounts(attention=arch.num_layers + mtp, dense_mlp=arch.num_layers + mtp - moe,
                       moe=moe, mtp=mtp)


def layer_flops(arch: ModelArch, tp: int = 1) -> LayerFlops:
    """Per-token training FLOPs of each layer kind; ``tp`` only sets the vocabulary padding."""
    h = arch.hidden_size
    n = arch.num_attention_heads
    ffn_factor = 3 if arch.swiglu else 2
    if arch.multi_latent_attention:
        qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
        if arch.q_lora_rank is None:
            q_term = h * n * qk
        else:
            # q down-projection, q up-projection and Megatron's "+1" for the q norm
            q_term = arch.q_lora_rank * (h + n * qk + 1)
        linear = (q_term + arch.kv_lora_rank * (h + n * (arch.qk_head_dim + arch.v_head_dim) + 1)
                  + h * arch.qk_pos_emb_head_dim + n * arch.v_head_dim * h)
        # (n*qk/2 + n*v/2) * 6: halved for the causal mask; even after halving (3 * n * ...).
        core = 3 * n * (qk + arch.v_head_dim)
        attention_linear = FWD_BWD_FMA * linear
    else:
        q = arch.head_dim * n
        kv = arch.head_dim * arch.query_groups
        attention_linear = FWD_BWD_FMA * (h * (q + 2 * kv) + q * h)
        # /2 for the causal mask, *2 for QK^T and (QK^T)V
        core = FWD_BWD_FMA * q
    routed = (FWD_BWD_FMA * h * arch.expert_ffn_hidden_size * arch.moe_router_topk * ffn_factor
              if arch.num_experts else 0)
    shared = FWD_BWD_FMA * h * (arch.moe_shared_expert_intermediate_size or 0) * ffn_factor
    return LayerFlops(
        attention_linear=attention_linear,
        attention_core_per_position=core,
        dense_mlp=FWD_BWD_FMA * h * arch.ffn_hidden_size * ffn_factor,
        routed_experts=routed,
        shared_experts=shared,
        router=FWD_BWD_FMA * h * (arch.num_experts or 0),
        mtp_projection=FWD_BWD_FMA * (3 * h + 2 * h * h),
        logits=FWD_BWD_FMA * h * padded_vocab_size(arch, tp),
    )


def palm_active_parameters(arch: ModelArch, tp: int = 1) -> int:
    """N of the PaLM convention: parameters one token passes through, without the input
    embedding tables; the output projection counts (tied or not), and of the routed experts only
    top-k of num_experts."""
    counts = ParameterModel(arch).model_counts()
    expert = counts.expert * arch.moe_router_topk // arch.num_experts if arch.num_experts else 0
    return counts.dense + expert + padded_vocab_size(arch, tp) * arch.hidden_size


def flops_terms(arch: ModelArch, seq_length: int, batch_size: int, tp: int = 1,
                convention: str = "megatron") -> FlopsTerms:
    """FLOPs of one iteration of ``batch_size`` full-length sequences of ``seq_length`` tokens.

    ``tp`` is the tensor-parallel size, which sets Megatron's vocabulary padding.
    """
    if convention not in CONVENTIONS:
        raise FoldingError(f"unknown FLOPs convention {convention!r}; "
                           f"choose from {', '.join(CONVENTIONS)}")
    per = layer_flops(arch, tp)
    count = layer_counts(arch)
    tokens = batch_size * seq_length
    core = tokens * seq_length * per.attention_core_per_position * count.attention
    if convention in ("full-attention", "palm"):
        core *= 2
    if convention == "palm":
        return FlopsTerms(attention_core=core,
                          parameters=FWD_BWD_FMA * tokens * palm_active_parameters(arch, tp))
    return FlopsTerms(
        attention_linear=tokens * per.attention_linear * count.attention,
        attention_core=core,
        dense_mlp=tokens * per.dense_mlp * count.dense_mlp,
        routed_experts=tokens * per.routed_experts * count.moe,
        shared_experts=tokens * per.shared_experts * count.moe,
        router=tokens * per.router * count.moe if convention == "router" else 0,
        mtp_projection=tokens * per.mtp_projection * count.mtp,
        logits=tokens * per.logits * (count.mtp + 1),
    )


def training_flops(arch: ModelArch, seq_length: int, batch_size: int, tp: int = 1,
                   convention: str = "megatron") -> int:
    """Total FLOPs of one iteration (an exact integer)."""
    return flops_terms(arch, seq_length, batch_size, tp, convention).total
