"""Which parameter tensors each rank holds, named and shaped as Megatron-Core builds them.

``rank_parameters`` lists, for one pipeline rank (and one virtual stage), every parameter of the
model chunk Megatron's GPTModel builds there, in registration order, with its per-rank shape after
the tensor, expert-tensor and expert parallel splits. Each tensor has a kind:

- ``dense``: attention, dense MLPs, shared experts, router, norms. Gradients are reduced over
  the attention DP x CP group, so the distributed optimizer shards them over DP x CP.
- ``expert``: routed experts (Megatron marks them ``allreduce=False``). Reduced over EDP.
- ``embedding``: word and position embeddings and the output layer. Reduced over DP x CP like
  dense parameters; kept apart because they sit only on the first and last stages.

Layouts follow the local (Megatron-Core only) layer spec, whose parameter shapes equal those of
the Transformer Engine spec except for MLA at TP > 1, where the TE spec keeps the low-rank
down-projections whole on each TP rank (modelled here) and the local spec splits them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from folding.errors import FoldingError
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch

KINDS = ("dense", "expert", "embedding")


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor on one rank."""

    name: str
    """Megatron's name inside the model chunk, e.g. ``decoder.layers.0.mlp.router.weight``."""
    shape: Tuple[int, ...]
    """Shape on this rank."""
    kind: str
    """dense, expert or embedding."""
    shared_embedding: bool = False
    """Megatron's ``shared_embedding`` attribute: the tensor gets a gradient bucket of its own."""

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ParamCounts:
    """Parameter elements on one rank, by kind."""

    dense: int = 0
    """Attention, dense MLP, shared-expert, router and norm parameters."""
    expert: int = 0
    """Routed-expert parameters."""
    embedding: int = 0
    """Word/position embeddings and the output layer."""

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.embedding

    def __add__(self, other: "ParamCounts") -> "ParamCounts":
        return ParamCounts(self.dense + other.dense, self.expert + other.expert,
                           self.embedding + other.embedding)

    def scaled(self, factor: int) -> "ParamCounts":
        return ParamCounts(self.dense * factor, self.expert * factor, self.embedding * factor)


def padded_vocab_size(arch: ModelArch, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by x TP."""
    multiple = arch.make_vocab_size_divisible_by * tp
    return -(-arch.vocab_size // multiple) * multiple


def expert_gradients_over_edp(spec: FoldingSpec) -> bool:
    """Whether routed-expert gradients are reduced (and their optimizer state sharded) over EDP.

    Megatron marks expert parameters ``allreduce=False`` when EP > 1 or ETP != TP; otherwise
    EDP equals DP x CP and they join the dense gradient buffer. (megatron-core 0.16 tests EP > 1
    only, so with EP = 1 and ETP != TP it reduces expert gradients over DP x CP, the wrong
    group; the planner does not propose that layout.)
    """
    return spec.ep > 1 or spec.etp != spec.tp


def count_by_kind(params: List[ParamTensor]) -> ParamCounts:
    totals = {k: 0 for k in KINDS}
    for p in params:
        totals[p.kind] += p.numel
    return ParamCounts(**totals)


# ----------------------------------------------------------------------------- pipeline split
def layers_per_chunk(arch: ModelArch, pp: int, vpp: Optional[int]) -> int:
    """Decoder layers in each model chunk (Megatron's even split over PP x VPP chunks)."""
    chunks = pp * (vpp or 1)
    if arch.num_layers % chunks:
        raise FoldingError(f"num_layers={arch.num_layers} is not divisible by PP x VPP = {chunks}")
    return arch.num_layers // chunks


def stage_layer_indices(arch: ModelArch, pp: int, vpp: Optional[int], pp_rank: int,
                        vp_stage: Optional[int] = None) -> List[int]:
    """Global indices of the decoder layers in one model chunk (Megatron's even split).

    With interleaving, chunk ``vp_stage`` of rank ``pp_rank`` holds layers starting at
    vp_stage * L / VPP + pp_rank * L / (PP * VPP).
    """
    per_chunk = layers_per_chunk(arch, pp, vpp)
    offset = ((vp_stage or 0) * pp + pp_rank) * per_chunk
    return list(range(offset, offset + per_chunk))


def layer_chunk(arch: ModelArch, pp: int, vpp: Optional[int], layer: int) -> Tuple[int, int, int]:
    """(pipeline rank, virtual stage, index inside the chunk) of global decoder layer ``layer``:
    the inverse of ``stage_layer_indices``."""
    chunk, local = divmod(layer, layers_per_chunk(arch, pp, vpp))
    vp_stage, pp_rank = divmod(chunk, pp)
    return pp_rank, vp_stage, local


def chunk_roles(pp: int, vpp: Optional[int], pp_rank: int, vp_stage: Optional[int]) -> Tuple[bool, bool]:
    """(pre_process, post_process) of a model chunk: first and last virtual stage of the model."""
    chunk = vp_stage or 0
    last_chunk = (vpp or 1) - 1
    return pp_rank == 0 and chunk == 0, pp_rank == pp - 1 and chunk == last_chunk


# ----------------------------------------------------------------------------- layers
def _norm(arch: ModelArch, name: str, size: int) -> List[ParamTensor]:
    out = [ParamTensor(f"{name}.weight", (size,), "dense")]
    if arch.normalization == "LayerNorm":
        out.append(ParamTensor(f"{name}.bias", (size,), "dense"))
    return out


def _linear(name: str, out_features: int, in_features: int, kind: str, bias: bool,
            column_split: int = 1, row_split: int = 1) -> List[ParamTensor]:
    """A Megatron linear layer: column-parallel splits the output, row-parallel the input.

    A row-parallel bias is added after the reduction, so it is kept whole.
    """
    out = [ParamTensor(f"{name}.weight", (out_features // column_split, in_features // row_split),
                       kind)]
    if bias:
        out.append(ParamTensor(f"{name}.bias", (out_features // column_split,), kind))
    return out


def _attention(arch: ModelArch, prefix: str, tp: int) -> List[ParamTensor]:
    h, bias = arch.hidden_size, arch.add_bias_linear
    n = arch.num_attention_heads
    if arch.multi_latent_attention:
        if bias or arch.add_qkv_bias:
            raise FoldingError("multi-latent attention with linear biases is not modelled")
        qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
        out = _linear(f"{prefix}.linear_proj", h, n * arch.v_head_dim, "dense", False, row_split=tp)
        if arch.q_lora_rank is None:
            out += _linear(f"{prefix}.linear_q_proj", n * qk, h, "dense", False, column_split=tp)
        else:
            out += _linear(f"{prefix}.linear_q_down_proj", arch.q_lora_rank, h, "dense", False)
            out += _linear(f"{prefix}.linear_q_up_proj", n * qk, arch.q_lora_rank, "dense", False,
                           column_split=tp)
        out += _linear(f"{prefix}.linear_kv_down_proj", arch.kv_lora_rank + arch.qk_pos_emb_head_dim,
                       h, "dense", False)
        out += _linear(f"{prefix}.linear_kv_up_proj", n * (arch.qk_head_dim + arch.v_head_dim),
                       arch.kv_lora_rank, "dense", False, column_split=tp)
        if arch.qk_layernorm:
            if arch.q_lora_rank is not None:
                out += _norm(arch, f"{prefix}.q_layernorm", arch.q_lora_rank)
            out += _norm(arch, f"{prefix}.kv_layernorm", arch.kv_lora_rank)
        return out
    d, g = arch.head_dim, arch.query_groups
    out = _linear(f"{prefix}.linear_proj", h, n * d, "dense", bias, row_split=tp)
    out += _linear(f"{prefix}.linear_qkv", (n + 2 * g) * d, h, "dense", bias or arch.add_qkv_bias,
                   column_split=tp)
    if arch.qk_layernorm:
        out += _norm(arch, f"{prefix}.q_layernorm", d)
        out += _norm(arch, f"{prefix}.k_layernorm", d)
    return out


def _mlp(arch: ModelArch, prefix: str, ffn: int, split: int, kind: str, bias: bool) -> List[ParamTensor]:
    gated = 2 if arch.swiglu else 1
    h = arch.hidden_size
    return (_linear(f"{prefix}.linear_fc1", ffn * gated, h, kind, bias, column_split=split)
            + _linear(f"{prefix}.linear_fc2", h, ffn, kind, bias, row_split=split))


def _moe(arch: ModelArch, prefix: str, tp: int, etp: int, ep: int) -> List[ParamTensor]:
    h = arch.hidden_size
    out = [ParamTensor(f"{prefix}.router.weight", (arch.num_experts, h), "dense")]
    if arch.add_bias_linear:
        out.append(ParamTensor(f"{prefix}.router.bias", (arch.num_experts,), "dense"))
    for local in range(arch.num_experts // ep):
        out += _mlp(arch, f"{prefix}.experts.local_experts.{local}", arch.expert_ffn_hidden_size,
                    etp, "expert", arch.add_bias_linear)
    if arch.moe_shared_expert_intermediate_size:
        # A module's own parameters come before its children's in named_parameters().
        if arch.moe_shared_expert_gate:
            out.append(ParamTensor(f"{prefix}.shared_experts.gate_weight", (1, h), "dense"))
        out += _mlp(arch, f"{prefix}.shared_experts", arch.moe_shared_expert_intermediate_size,
                    tp, "dense", False)
    return out


def layer_parameters(arch: ModelArch, is_moe: bool, tp: int, etp: int, ep: int,
                     prefix: str = "layer") -> List[ParamTensor]:
    """One transformer layer on one rank, in Megatron's registration order."""
    out = _norm(arch, f"{prefix}.input_layernorm", arch.hidden_size)
    out += _attention(arch, f"{prefix}.self_attention", tp)
    out += _norm(arch, f"{prefix}.pre_mlp_layernorm", arch.hidden_size)
    if is_moe:
        out += _moe(arch, f"{prefix}.mlp", tp, etp, ep)
    else:
        out += _mlp(arch, f"{prefix}.mlp", arch.ffn_hidden_size, tp, "dense", arch.add_bias_linear)
    return out


def _mtp_layer(arch: ModelArch, prefix: str, last_is_moe: bool, tp: int, etp: int,
               ep: int) -> List[ParamTensor]:
    """A multi-token-prediction layer: two norms, the 2h -> h projection, a transformer layer
    of the same type as the last decoder layer, and its own final norm."""
    h = arch.hidden_size
    out = _norm(arch, f"{prefix}.enorm", h) + _norm(arch, f"{prefix}.hnorm", h)
    out += _linear(f"{prefix}.eh_proj", h, 2 * h, "dense", False, column_split=tp)
    out += layer_parameters(arch, last_is_moe, tp, etp, ep, f"{prefix}.mtp_model_layer")
    out += _norm(arch, f"{prefix}.final_layernorm", h)
    return out


# ----------------------------------------------------------------------------- a rank's chunk
def rank_parameters(arch: ModelArch, spec: FoldingSpec, pp_rank: int = 0,
                    vp_stage: Optional[int] = None, max_sequence_length: Optional[int] = None
                    ) -> List[ParamTensor]:
    """Every parameter of the model chunk on pipeline rank ``pp_rank`` (virtual stage
    ``vp_stage`` when interleaving), in Megatron's registration order.

    The result is the same for every rank of the stage: TP, ETP and EP ranks hold equally
    sized shards. ``max_sequence_length`` sizes learned absolute position embeddings.
    """
    tp, etp, ep, pp, vpp = spec.tp, spec.etp, spec.ep, spec.pp, spec.vpp
    if arch.num_experts is not None and arch.num_experts % ep:
        raise FoldingError(f"EP={ep} does not divide num_experts={arch.num_experts}")
    pre, post = chunk_roles(pp, vpp, pp_rank, vp_stage)
    tied = not arch.untie_embeddings_and_output_weights
    mtp = bool(arch.mtp_num_layers) and post
    pattern = arch.moe_layer_pattern()
    vocab = padded_vocab_size(arch, tp) // tp
    h = arch.hidden_size
    split_embedding = pp > 1 and (tied or bool(arch.mtp_num_layers))

    out: List[ParamTensor] = []
    if pre or mtp:
        out.append(ParamTensor("embedding.word_embeddings.weight", (vocab, h), "embedding",
                               shared_embedding=split_embedding))
        if arch.position_embedding_type == "learned_absolute":
            length = arch.max_position_embeddings or max_sequence_length
            if length is None:
                raise FoldingError("learned_absolute position embeddings need max_position_embeddings "
                                   "or the training seq_length")
            out.append(ParamTensor("embedding.position_embeddings.weight", (length, h), "embedding"))
    for local, layer in enumerate(stage_layer_indices(arch, pp, vpp, pp_rank, vp_stage)):
        out += layer_parameters(arch, bool(pattern[layer]), tp, spec.etp, ep,
                                f"decoder.layers.{local}")
    if post:
        out += _norm(arch, "decoder.final_layernorm", h)
    if mtp:
        for i in range(arch.mtp_num_layers):
            out += _mtp_layer(arch, f"mtp.layers.{i}", bool(pattern[-1]), tp, etp, ep)
    if post and (not tied or not pre):
        # A tied output layer on a later stage is a copy of the embedding, kept in sync by an
        # all-reduce over the embedding group; the embedding itself is the shared tensor then.
        shared = split_embedding and tied and not pre and not mtp
        out.append(ParamTensor("output_layer.weight", (vocab, h), "embedding", shared_embedding=shared))
    return out


def full_parameters(arch: ModelArch) -> Dict[str, Tuple[int, ...]]:
    """Names and shapes of the whole model's parameters, without parallelism, layers named by
    their global index, in Megatron's registration order: the full weights that ranks shard.

    The vocabulary is unpadded, as the CPU runtime builds it (``folding.megatron.model``).
    """
    unpadded = dataclasses.replace(arch, make_vocab_size_divisible_by=1)
    return {p.name: p.shape for p in rank_parameters(unpadded, FoldingSpec(world_size=1))}


class ParameterModel:
    """Per-rank parameter counts of one architecture, memoised per layer type and split.

    ``rank_parameters`` lists tensors; the planner asks for counts of thousands of foldings,
    so this sums each layer type once per (TP, ETP, EP) and multiplies.
    """

    def __init__(self, arch: ModelArch, max_sequence_length: Optional[int] = None):
        self.arch = arch
        self.max_sequence_length = max_sequence_length
        self.pattern = arch.moe_layer_pattern()
        self._layer: Dict[Tuple[bool, int, int, int], ParamCounts] = {}
        self._rank: Dict[tuple, ParamCounts] = {}
        self._kinds: Dict[tuple, List[Tuple[int, int]]] = {}

    def chunk_layer_kinds(self, pp: int, vpp: Optional[int], pp_rank: int) -> List[Tuple[int, int]]:
        """(MoE layers, dense layers) of each model chunk of a pipeline rank."""
        key = (pp, vpp, pp_rank)
        if key not in self._kinds:
            kinds = []
            for chunk in range(vpp or 1):
                layers = stage_layer_indices(self.arch, pp, vpp, pp_rank, chunk if vpp else None)
                moe = sum(self.pattern[i] for i in layers)
                kinds.append((moe, len(layers) - moe))
            self._kinds[key] = kinds
        return self._kinds[key]

    def rank_layer_kinds(self, pp: int, vpp: Optional[int], pp_rank: int) -> Tuple[int, int]:
        """(MoE layers, dense layers) over all model chunks of a pipeline rank."""
        kinds = self.chunk_layer_kinds(pp, vpp, pp_rank)
        return sum(m for m, _ in kinds), sum(d for _, d in kinds)

    def layer_counts(self, is_moe: bool, tp: int, etp: int, ep: int) -> ParamCounts:
        key = (is_moe, tp, etp, ep)
        if key not in self._layer:
            self._layer[key] = count_by_kind(layer_parameters(self.arch, is_moe, tp, etp, ep))
        return self._layer[key]

    def chunk_counts(self, spec: FoldingSpec, pp_rank: int, vp_stage: Optional[int] = None) -> ParamCounts:
        """Counts equal to ``count_by_kind(rank_parameters(...))``, without listing tensors."""
        arch, tp, etp, ep = self.arch, spec.tp, spec.etp, spec.ep
        layers = stage_layer_indices(arch, spec.pp, spec.vpp, pp_rank, vp_stage)
        moe_layers = sum(self.pattern[i] for i in layers)
        total = ParamCounts()
        for is_moe, count in ((True, moe_layers), (False, len(layers) - moe_layers)):
            if count:
                total = total + self.layer_counts(is_moe, tp, etp, ep).scaled(count)
        pre, post = chunk_roles(spec.pp, spec.vpp, pp_rank, vp_stage)
        mtp = bool(arch.mtp_num_layers) and post
        vocab = padded_vocab_size(arch, tp) // tp
        embedding = 0
        if pre or mtp:
            embedding += vocab * arch.hidden_size
            if arch.position_embedding_type == "learned_absolute":
                embedding += (arch.max_position_embeddings or self.max_sequence_length) * arch.hidden_size
        if post and (arch.untie_embeddings_and_output_weights or not pre):
            embedding += vocab * arch.hidden_size
        extra = ParamCounts(embedding=embedding)
        if post:
            norm = arch.hidden_size * (2 if arch.normalization == "LayerNorm" else 1)
            extra = extra + ParamCounts(dense=norm)
            if mtp:
                per_mtp = count_by_kind(_mtp_layer(arch, "m", bool(self.pattern[-1]), tp, etp, ep))
                extra = extra + per_mtp.scaled(arch.mtp_num_layers)
        return total + extra

    def rank_counts(self, spec: FoldingSpec, pp_rank: int) -> ParamCounts:
        """All model chunks of one pipeline rank."""
        key = (spec.tp, spec.etp, spec.ep, spec.pp, spec.vpp, pp_rank)
        if key not in self._rank:
            total = ParamCounts()
            for chunk in range(spec.vpp or 1):
                total = total + self.chunk_counts(spec, pp_rank, chunk if spec.vpp else None)
            self._rank[key] = total
        return self._rank[key]

    def model_counts(self) -> ParamCounts:
        """The whole model without parallelism (TP = EP = PP = 1)."""
        spec = FoldingSpec(world_size=1)
        return self.chunk_counts(spec, 0)


def rank_parameter_counts(arch: ModelArch, spec: FoldingSpec, pp_rank: int,
                          max_sequence_length: Optional[int] = None) -> ParamCounts:
    """Parameters on any rank of pipeline stage ``pp_rank`` (all its model chunks), by kind:
    dense, expert and embedding. The figure a runtime check compares with a built model."""
    return ParameterModel(arch, max_sequence_length).rank_counts(spec, pp_rank)
