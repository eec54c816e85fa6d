"""Weight layout: where every parameter of a GPT + MoE model lives under a folding.

The *full* model is the one a single process holds (TP = PP = EP = 1): parameter names as in
Megatron's GPTModel, layers numbered 0..L-1, experts 0..E-1 (listed by
``folding.layout.parameters.full_parameters``, the one description of GPTModel's tensors). A *shard* is what one rank holds:
for each virtual pipeline chunk, the parameters of that chunk under their local names (local
layer and expert indices), sliced for the rank's TP or ETP position.

Rules, one per kind of parameter (``ParamRule``):
- TP column split (dim 0): QKV (query groups stay whole, so contiguous slices are correct),
  vocabulary of embedding and output layer, dense and shared-expert fc1;
- TP row split (dim 1): attention output projection, dense and shared-expert fc2;
- ETP column/row split for each expert's fc1/fc2; EP decides which experts a rank holds;
- SwiGLU fc1 holds [gate; up]: each TP/ETP rank takes its slice of *both* halves;
- norms, the router and biases of row-parallel layers are replicated;
- PP/VPP decide which layers a chunk holds; the embedding lives on the first stage, the final
  norm and output layer on the last.

``shard`` and ``unshard`` are exact inverses (no arithmetic, only slicing and concatenation),
pure functions of tensors and a ``FoldingSpec``. The same rules move optimizer state, checkpoints
and experts between ranks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from folding.errors import FoldingError
from folding.layout.parameters import layer_chunk, stage_layer_indices
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch

ShardKey = Tuple[int, str]  # (virtual pipeline chunk, local parameter name)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")
# SequentialMLP names experts local_experts.<j>.*; TE's grouped GEMM names weights weight<j>.
_SEQUENTIAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.(weight|bias)(\d+)$")


@dataclass(frozen=True)
class ParamRule:
    """How one parameter is split."""

    group: Optional[str]
    """'tp' (attention mesh), 'etp' (MoE mesh), or None for a replicated parameter."""
    dim: int = 0
    """Dimension that is split."""
    gated: bool = False
    """SwiGLU fc1: [gate; up] halves are split separately."""


REPLICATED = ParamRule(None)


def _rule_in_layer(rest: str, swiglu: bool) -> ParamRule:
    """The rule of a parameter inside a transformer layer, by its name after the layer index."""
    if rest.startswith("self_attention.linear_qkv.") and not rest.endswith("layer_norm_weight") \
            and not rest.endswith("layer_norm_bias"):
        return ParamRule("tp", 0)
    if rest == "self_attention.linear_proj.weight":
        return ParamRule("tp", 1)
    expert = _SEQUENTIAL_EXPERT.match(rest)
    if expert or _GROUPED_EXPERT.match(rest):
        leaf = expert.group(2) if expert else "{}.{}".format(*_GROUPED_EXPERT.match(rest).group(1, 2))
        if leaf.startswith("linear_fc1.") and "layer_norm" not in leaf:
            return ParamRule("etp", 0, gated=swiglu)
        if leaf == "linear_fc2.weight":
            return ParamRule("etp", 1)
        return REPLICATED
    for mlp in ("mlp.", "mlp.shared_experts."):
        if rest in (mlp + "linear_fc1.weight", mlp + "linear_fc1.bias"):
            return ParamRule("tp", 0, gated=swiglu)
        if rest == mlp + "linear_fc2.weight":
            return ParamRule("tp", 1)
    return REPLICATED


def param_rule(full_name: str, swiglu: bool) -> ParamRule:
    if full_name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return ParamRule("tp", 0)
    layer = _LAYER.match(full_name)
    if layer:
        return _rule_in_layer(layer.group(2), swiglu)
    return REPLICATED


# ------------------------------------------------------------------------------- name mapping
def slot_experts(arch: ModelArch, global_layer: int, placement=None) -> List[int]:
    """The logical expert of every slot of a MoE layer: the placement's row for it, or
    Megatron's contiguous layout (slot s holds expert s) without a placement."""
    if placement is None:
        return list(range(arch.num_experts or 0))
    return [int(e) for e in placement.layers[arch.moe_ordinals()[global_layer + 1]]]


def slots_per_rank(arch: ModelArch, spec: FoldingSpec, placement=None) -> int:
    return placement.slots_per_rank if placement is not None else (arch.num_experts or 1) // spec.ep


def _expert_index(rest: str):
    """(slot index, name with another index) of an expert parameter; None for the others."""
    m = _SEQUENTIAL_EXPERT.match(rest)
    if m:
        return int(m.group(1)), lambda i: f"mlp.experts.local_experts.{i}.{m.group(2)}"
    m = _GROUPED_EXPERT.match(rest)
    if m:
        return int(m.group(3)), lambda i: f"mlp.experts.{m.group(1)}.{m.group(2)}{i}"
    return None


def local_to_full_name(local: str, arch: ModelArch, spec: FoldingSpec, rank: int, vp_stage: int,
                       placement=None) -> str:
    coords = spec.coordinates(rank)
    layer = _LAYER.match(local)
    if not layer:
        return local
    chunk = stage_layer_indices(arch, spec.pp, spec.vpp, coords["attention"]["pp"], vp_stage)
    global_layer = chunk[int(layer.group(1))]
    rest = layer.group(2)
    expert = _expert_index(rest)
    if expert is not None:
        slot = coords["moe"]["ep"] * slots_per_rank(arch, spec, placement) + expert[0]
        rest = expert[1](slot_experts(arch, global_layer, placement)[slot])
    return f"decoder.layers.{global_layer}.{rest}"


def full_to_local_names(full: str, arch: ModelArch, spec: FoldingSpec, rank: int,
                        placement=None) -> List[ShardKey]:
    """Every (vp_stage, local name) under which ``rank`` holds a full parameter: none, one, or
    one per slot of the rank that holds the expert."""
    coords = spec.coordinates(rank)
    pp_rank, last_pp = coords["attention"]["pp"], spec.pp - 1
    vpp = spec.vpp or 1
    if full.startswith("embedding."):
        return [(0, full)] if pp_rank == 0 else []
    if full.startswith("output_layer.") or full.startswith("decoder.final_layernorm."):
        return [(vpp - 1, full)] if pp_rank == last_pp else []
    layer = _LAYER.match(full)
    if not layer:
        raise FoldingError(f"parameter {full!r} has no known place in the weight layout")
    global_layer = int(layer.group(1))
    owner_pp, vp_stage, local_layer = layer_chunk(arch, spec.pp, spec.vpp, global_layer)
    if owner_pp != pp_rank:
        return []
    rest = layer.group(2)
    expert = _expert_index(rest)
    if expert is None:
        return [(vp_stage, f"decoder.layers.{local_layer}.{rest}")]
    per_rank = slots_per_rank(arch, spec, placement)
    first = coords["moe"]["ep"] * per_rank
    mine = slot_experts(arch, global_layer, placement)[first:first + per_rank]
    return [(vp_stage, f"decoder.layers.{local_layer}.{expert[1](j)}")
            for j, e in enumerate(mine) if e == expert[0]]


# ------------------------------------------------------------------------------- slicing
def _split_index(rule: ParamRule, spec: FoldingSpec, rank: int) -> Tuple[int, int]:
    """(position, group size) of ``rank`` in the group that splits a parameter."""
    coords = spec.coordinates(rank)
    if rule.group == "tp":
        return coords["attention"]["tp"], spec.tp
    if rule.group == "etp":
        return coords["moe"]["etp"], spec.etp
    return 0, 1


def slice_for(full: torch.Tensor, rule: ParamRule, index: int, parts: int) -> torch.Tensor:
    """The ``index``-th of ``parts`` slices of a full tensor under ``rule``."""
    if parts == 1 or rule.group is None:
        return full
    dim = rule.dim if full.dim() > rule.dim else 0
    if full.shape[dim] % (parts * (2 if rule.gated else 1)):
        raise FoldingError(f"dimension {dim} of size {full.shape[dim]} does not split into {parts} parts")
    if rule.gated:
        halves = full.chunk(2, dim=dim)
        return torch.cat([h.chunk(parts, dim=dim)[index] for h in halves], dim=dim)
    return full.chunk(parts, dim=dim)[index]


def join_slices(slices: List[torch.Tensor], rule: ParamRule) -> torch.Tensor:
    """Inverse of ``slice_for`` over all indices."""
    if len(slices) == 1 or rule.group is None:
        return slices[0]
    dim = rule.dim if slices[0].dim() > rule.dim else 0
    if rule.gated:
        halves = [s.chunk(2, dim=dim) for s in slices]
        return torch.cat([torch.cat([h[0] for h in halves], dim=dim),
                          torch.cat([h[1] for h in halves], dim=dim)], dim=dim)
    return torch.cat(slices, dim=dim)


# ------------------------------------------------------------------------------- whole models
def shard(full: Dict[str, torch.Tensor], arch: ModelArch, spec: FoldingSpec,
          rank: int, placement=None) -> Dict[ShardKey, torch.Tensor]:
    """What ``rank`` holds of a full state dict: {(vp_stage, local name): tensor}; an expert
    with several slots on the rank is copied into each."""
    out = {}
    for name, tensor in full.items():
        keys = full_to_local_names(name, arch, spec, rank, placement)
        if not keys:
            continue
        rule = param_rule(name, arch.swiglu)
        piece = slice_for(tensor, rule, *_split_index(rule, spec, rank))
        for key in keys:
            out[key] = piece
    return out


def unshard(shards: List[Dict[ShardKey, torch.Tensor]], arch: ModelArch, spec: FoldingSpec,
            check_replicas: bool = True, placement=None) -> Dict[str, torch.Tensor]:
    """Rebuild the full state dict from every rank's shard (``shards[rank]``).

    With ``check_replicas``, copies of the same slice (on DP, EDP or TP ranks, or in replica
    slots of an expert) must be bit-identical, or FoldingError names the first that is not.
    """
    if len(shards) != spec.world_size:
        raise FoldingError(f"unshard needs {spec.world_size} shards, got {len(shards)}")
    pieces: Dict[str, Dict[int, torch.Tensor]] = {}
    owners: Dict[Tuple[str, int], int] = {}
    parts_of: Dict[str, int] = {}
    for rank, local in enumerate(shards):
        for (vp_stage, local_name), tensor in local.items():
            name = local_to_full_name(local_name, arch, spec, rank, vp_stage, placement)
            rule = param_rule(name, arch.swiglu)
            index, parts = _split_index(rule, spec, rank)
            parts_of[name] = parts
            slot = pieces.setdefault(name, {})
            if index in slot:
                if check_replicas and not torch.equal(slot[index], tensor):
                    raise FoldingError(f"{name}: ranks {owners[(name, index)]} and {rank} hold "
                                       f"different copies of slice {index}")
                continue
            slot[index] = tensor
            owners[(name, index)] = rank
    full = {}
    for name, slot in pieces.items():
        parts = parts_of[name]
        if sorted(slot) != list(range(parts)):
            raise FoldingError(f"{name}: slices {sorted(set(range(parts)) - set(slot))} are missing")
        full[name] = join_slices([slot[i] for i in range(parts)], param_rule(name, arch.swiglu))
    return full


def named_parameters_of_chunks(chunks: Iterable[torch.nn.Module]) -> Dict[ShardKey, torch.nn.Parameter]:
    """{(vp_stage, local name): parameter} of a rank's model chunks (DDP wrappers unwrapped)."""
    out = {}
    for vp_stage, chunk in enumerate(chunks):
        module = getattr(chunk, "module", chunk)
        for name, param in module.named_parameters():
            out[(vp_stage, name)] = param
    return out
