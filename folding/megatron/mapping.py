"""The one translation between a ``FoldingSpec`` and Megatron's names for the same degrees.

Megatron spells each parallel degree the same way in ``initialize_model_parallel``'s keywords,
``TransformerConfig``'s fields and pretrain_gpt.py's parsed arguments
(``tensor_model_parallel_size``...), and as a flag with dashes; ``MEGATRON_DEGREES`` is that
table. Building groups (``groups.initialize``), building a config (``model.transformer_config``),
writing flags (``degree_flags``) and reading a parsed namespace back (``spec_from_args``)
all go through here, so a Megatron rename is one edit. Pure: Megatron is never imported.
"""

from __future__ import annotations

from typing import Dict, List

from folding.errors import FoldingError
from folding.mesh import DEFAULT_ORDER, FoldingSpec

# FoldingSpec field -> Megatron's name (initialize_model_parallel keyword, TransformerConfig
# field and parsed argument alike).
MEGATRON_DEGREES = (
    ("tp", "tensor_model_parallel_size"),
    ("pp", "pipeline_model_parallel_size"),
    ("vpp", "virtual_pipeline_model_parallel_size"),
    ("cp", "context_parallel_size"),
    ("ep", "expert_model_parallel_size"),
    ("etp", "expert_tensor_parallel_size"),
)

# Megatron's --use-tp-pp-dp-mapping switches to this order; no flag selects any other.
TP_PP_DP_ORDER = "tp-cp-ep-pp-dp"

# Megatron arguments that split layers unevenly over pipeline stages: with any of them set,
# FoldingSpec's "layers divisible by PP x VPP" rule does not describe the model.
UNEVEN_PIPELINE_ARGUMENTS = (
    "num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage",
    "decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers",
    "pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split")


def flag(name: str) -> str:
    """A Megatron argument's command-line flag: tensor_model_parallel_size ->
    --tensor-model-parallel-size."""
    return "--" + name.replace("_", "-")


def megatron_degrees(spec: FoldingSpec) -> Dict[str, int]:
    """The spec's degrees under Megatron's names."""
    return {name: getattr(spec, field) for field, name in MEGATRON_DEGREES}


def parallel_state_kwargs(spec: FoldingSpec) -> Dict:
    """Keywords of ``megatron.core.parallel_state.initialize_model_parallel`` for ``spec``."""
    return dict(megatron_degrees(spec), order=spec.order)


def config_kwargs(spec: FoldingSpec) -> Dict:
    """The parallel fields of ``TransformerConfig`` for ``spec``."""
    return dict(megatron_degrees(spec), sequence_parallel=spec.sequence_parallel,
                cp_comm_type=spec.cp_comm_type)


def order_flags(order: str) -> List[str]:
    """The flag that selects ``order`` in pretrain_gpt.py (none for the default); refuses an
    order Megatron's arguments cannot express."""
    if order == DEFAULT_ORDER:
        return []
    if order == TP_PP_DP_ORDER:
        return ["--use-tp-pp-dp-mapping"]
    raise FoldingError(f"rank order {order!r} has no Megatron flag: Megatron offers "
                       f"{DEFAULT_ORDER} (default) and {TP_PP_DP_ORDER} (--use-tp-pp-dp-mapping)")


def degree_flags(spec: FoldingSpec, num_layers: int, moe: bool) -> List[str]:
    """pretrain_gpt.py's parallelism flags for ``spec`` (expert degrees only for a MoE model).

    The virtual pipeline is given as layers per virtual stage, which is what the flag takes.
    """
    names = dict(MEGATRON_DEGREES)

    def degree(field: str) -> List[str]:
        return [flag(names[field]), str(getattr(spec, field))]

    f = degree("tp") + degree("pp") + degree("cp")
    if spec.cp > 1:
        f += ["--cp-comm-type", spec.cp_comm_type]
    if spec.vpp:
        f += ["--num-layers-per-virtual-pipeline-stage", str(num_layers // (spec.pp * spec.vpp))]
    if moe:
        f += degree("ep") + degree("etp")
    if spec.sequence_parallel:
        f.append("--sequence-parallel")
    return f + order_flags(spec.order)


def spec_from_args(args) -> FoldingSpec:
    """The folding of a parsed, validated Megatron argument namespace (raises InvalidFolding).

    Every folding rule is FoldingSpec's; this only translates names. ``folding_gpus_per_node``
    (the plugin's ``--folding-gpus-per-node``) defaults to 8.
    """
    order = TP_PP_DP_ORDER if getattr(args, "use_tp_pp_dp_mapping", False) else DEFAULT_ORDER
    uneven = any(getattr(args, name, None) for name in UNEVEN_PIPELINE_ARGUMENTS)
    query_groups = args.num_query_groups if getattr(args, "group_query_attention", False) else None
    degrees = {field: getattr(args, name) for field, name in MEGATRON_DEGREES}
    # Megatron parses --cp-comm-type as a list (one type per layer allowed); one type for all
    # layers is what the CP attention here offers.
    comm = getattr(args, "cp_comm_type", None) or "p2p"
    if isinstance(comm, (list, tuple)):
        if len(set(comm)) != 1:
            raise FoldingError(f"--cp-comm-type gives several types ({' '.join(comm)}); the "
                               f"plugin's context-parallel attention takes one for all layers")
        comm = comm[0]
    return FoldingSpec(
        world_size=args.world_size,
        order=order,
        gpus_per_node=getattr(args, "folding_gpus_per_node", 8),
        num_experts=args.num_experts,
        num_layers=None if uneven else args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=query_groups,
        sequence_parallel=bool(args.sequence_parallel),
        cp_comm_type=comm,
        **degrees,
    )


def model_from_args(args):
    """The model facts of Megatron's arguments (``ModelArch``) that a placement is checked
    against and that routing statistics and expert moves are sized by."""
    from folding.recipe import ModelArch

    vocab = getattr(args, "padded_vocab_size", None) or getattr(args, "vocab_size", None)
    # Megatron's parser always sets the top-k; a hand-built namespace may leave it to the default.
    topk = {} if getattr(args, "moe_router_topk", None) is None else {"moe_router_topk": args.moe_router_topk}
    return ModelArch(num_layers=args.num_layers, hidden_size=args.hidden_size,
                     num_attention_heads=args.num_attention_heads, vocab_size=vocab,
                     ffn_hidden_size=args.ffn_hidden_size, num_experts=args.num_experts,
                     moe_layer_freq=args.moe_layer_freq, **topk)


def refuse_checkpoints_by_position(args, flag: str) -> None:
    """Checkpoints written or read while ``flag`` moves experts off Megatron's contiguous layout
    must name experts by what they are. The folded layer's sharded state dict does (torch_dist),
    but two formats lay state out by position instead, so they would resume experts, or their
    Adam moments, on the wrong slots (FoldingError, one line)."""
    if not (getattr(args, "save", None) or getattr(args, "load", None)):
        return
    if getattr(args, "ckpt_format", "torch_dist") == "torch":
        raise FoldingError(f"{flag} with --ckpt-format torch: that format stores experts by "
                           f"slot, so a checkpoint would load the wrong experts under another "
                           f"placement; use --ckpt-format torch_dist")
    if getattr(args, "use_distributed_optimizer", False) and \
            not getattr(args, "dist_ckpt_optim_fully_reshardable", False):
        raise FoldingError(f"{flag} with --use-distributed-optimizer needs "
                           f"--dist-ckpt-optim-fully-reshardable: Megatron's default "
                           f"(dp_reshardable) optimizer checkpoint stores Adam's moments by buffer "
                           f"position, not by expert, so they would resume on the wrong experts "
                           f"under another placement")
