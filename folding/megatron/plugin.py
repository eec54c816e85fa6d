"""The plugin side of the Megatron-LM patches in ``patches/``: what pretrain_gpt.py calls.

This module owns five things and no rule of its own:

- ``add_arguments(parser)``: the ``--folding-*`` flags on Megatron's argument parser (Megatron's
  ``extra_args_provider`` convention: it takes the parser and returns it), the
  ``--folding-replace-*`` ones from ``folding.megatron.replacement``.
- ``spec_from_args(args)``: the ``FoldingSpec`` of a parsed and validated Megatron argument
  namespace (from ``folding.megatron.mapping``, re-exported here for the patches).
- ``check_mesh(spec)``: once Megatron-LM's ``initialize_megatron`` has built its process
  groups, compare each of them with the pure-Python mesh on every rank
  (``folding.megatron.groups.verify_megatron_groups``, the check ``initialize`` runs too).
- ``context_parallel_spec(spec, args)``: with CP > 1, the local spec's core attention replaced by
  ``folding.context_parallel``'s (Megatron's own refuses CP without Transformer Engine).
- ``folded_decoder_spec(spec, args)``: Megatron's GPT layer or decoder-block spec with every MoE
  layer swapped for ``FoldedMoELayer`` (``folding.dispatcher.moe_layer.folded_layer_spec``),
  experts placed as ``--folding-placement`` says. What the folded dispatcher cannot do under
  Megatron-LM's training loop is refused with one line naming the flag.

``layer_spec_provider`` and ``check_mesh_hook`` package the last two for megatron-core 0.19's
``GPTModelConfig`` (its ``transformer_layer_spec`` callable and ``pre_wrap_hooks``), which is how
pretrain_gpt.py builds models from that release on.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Optional

from folding.errors import FoldingError
from folding.megatron.mapping import model_from_args, refuse_checkpoints_by_position, spec_from_args
from folding.mesh import FoldingSpec

# Megatron flags the folded dispatcher cannot train with, and why.
_REFUSED_FLAGS = (
    ("moe_grouped_gemm", "--moe-grouped-gemm",
     "the folded MoE layer needs SequentialMLP experts (one module per expert slot)"),
    ("moe_shared_expert_overlap", "--moe-shared-expert-overlap",
     "Megatron would run the shared experts inside its own dispatcher, which the folded one "
     "replaces, so they would never run"),
    ("overlap_moe_expert_parallel_comm", "--overlap-moe-expert-parallel-comm",
     "the folded dispatcher is not checked under Megatron's overlapped expert-parallel schedule"),
)


def add_arguments(parser: argparse.ArgumentParser,
                  then: Optional[Callable] = None) -> argparse.ArgumentParser:
    """Add the ``--folding-*`` group to Megatron's parser and return the parser.

    ``then`` is another extra-args provider (ModelOpt's, in pretrain_gpt.py) run afterwards.
    """
    group = parser.add_argument_group(title="folding", description="MoE Parallel Folding")
    group.add_argument("--folding-check-mesh", action="store_true",
                       help="after Megatron's initialisation, compare every process group with "
                            "the folded mesh on every rank and stop all ranks on a difference")
    group.add_argument("--folding-dispatcher", action="store_true",
                       help="MoE layers dispatch with folding's FoldedMoELayer (deduplicated, "
                            "placement-aware all-to-all; SequentialMLP experts only)")
    group.add_argument("--folding-placement", metavar="FILE", default=None,
                       help="expert placement JSON (as written by `folding place`) for "
                            "--folding-dispatcher; default: Megatron's contiguous layout")
    group.add_argument("--folding-gpus-per-node", metavar="N", type=int, default=8,
                       help="ranks per node, for the layout report and the dispatcher's "
                            "same-node replica choice and node-level deduplication (default 8)")
    group.add_argument("--folding-node-dedup", choices=("auto", "on", "off"), default="auto",
                       help="--folding-dispatcher sends a token once per remote node, through one "
                            "rank there that forwards it inside its node (auto: when the EP group "
                            "spans several nodes)")
    from folding.megatron import replacement

    replacement.add_arguments(group)
    return then(parser) if then is not None else parser


def check_mesh(spec: FoldingSpec) -> int:
    """Verify Megatron's already built groups against ``spec`` on every rank (a collective).

    Raises ``folding.megatron.groups.MeshMismatch`` on every rank together when any group of
    any rank differs; returns the number of groups checked on this rank.
    """
    from folding.megatron.groups import verify_megatron_groups

    return verify_megatron_groups(spec)


def check_mesh_hook(args) -> Callable:
    """``check_mesh`` as a megatron-core 0.19 pre-wrap hook (runs once the model chunks exist).

    The folding is read from ``args`` at once, so a bad one is refused before any rank starts.
    """
    spec = spec_from_args(args)

    def hook(model):
        check_mesh(spec)
        return model

    return hook


# --------------------------------------------------------------------------- folded dispatcher
def folded_layer_arguments(args):
    """Refuse what the folded dispatcher cannot do (FoldingError); return what ``fold`` needs
    after the spec: the placement, the MoE ordinal of each layer, ranks per node, layers."""
    from folding.megatron.model import check_placement, identity_placement
    from folding.placement.placement import Placement

    if not args.num_experts:
        raise FoldingError("--folding-dispatcher needs a MoE model (--num-experts)")
    for name, flag, why in _REFUSED_FLAGS:
        if getattr(args, name, False):
            raise FoldingError(f"--folding-dispatcher does not work with {flag}: {why}")
    from folding.dispatcher.token_dispatcher import refuse_unsupported

    refuse_unsupported(args)  # CUDA-graph scopes over the planning, permute fusion, padding
    if getattr(args, "moe_token_dispatcher_type", "alltoall") == "flex":
        raise FoldingError("--folding-dispatcher does not work with --moe-token-dispatcher-type "
                           "flex: Megatron would first build its DeepEP/HybridEP dispatcher; "
                           "use alltoall")
    spec, arch = spec_from_args(args), model_from_args(args)
    from folding.megatron import replacement

    replacement.check_arguments(args)
    if args.folding_placement:
        placement = Placement.load(args.folding_placement)
        check_placement(placement, arch, spec)
        if placement.redundant_slots:
            raise FoldingError(f"{args.folding_placement} has {placement.redundant_slots} spare "
                               f"slot(s) per rank for replicas: Megatron-LM's training loop does "
                               f"not sum replica gradients (folding train does); use a placement "
                               f"without --redundant")
        refuse_checkpoints_by_position(args, "--folding-placement")
    else:
        placement = identity_placement(arch, spec)
    node_dedup = {"auto": None, "on": True, "off": False}[getattr(args, "folding_node_dedup", "auto")]
    return placement, arch.moe_ordinals(), spec.gpus_per_node, arch.num_layers, node_dedup


def fold(layer_or_block_spec, placement, ordinals, gpus_per_node, num_layers, node_dedup=None):
    """``layer_or_block_spec`` with its MoE layers folded (``folded_layer_arguments`` gives the
    rest). Folding a folded spec changes nothing, so a patched script run by ``folding
    megatron`` is folded once."""
    from folding.dispatcher.moe_layer import folded_layer_spec, is_folded_layer_spec, is_moe_layer_spec

    def to_fold(layer_spec):
        return is_moe_layer_spec(layer_spec) and not is_folded_layer_spec(layer_spec)

    if hasattr(layer_or_block_spec, "layer_specs"):  # TransformerBlockSubmodules: this stage
        layers = [folded_layer_spec(s, placement, ordinals, gpus_per_node, node_dedup) if to_fold(s)
                  else s for s in layer_or_block_spec.layer_specs]
        return dataclasses.replace(layer_or_block_spec, layer_specs=layers)
    if is_folded_layer_spec(layer_or_block_spec):
        return layer_or_block_spec
    if not is_moe_layer_spec(layer_or_block_spec):
        raise FoldingError(f"--folding-dispatcher: the decoder spec has no MoE layer to fold "
                           f"({type(layer_or_block_spec).__name__})")
    if len(ordinals) != num_layers:
        raise FoldingError("--folding-dispatcher: a single layer spec makes every layer a MoE "
                           "layer, but --moe-layer-freq makes some dense; use the decoder block "
                           "spec")
    return folded_layer_spec(layer_or_block_spec, placement, ordinals, gpus_per_node, node_dedup)


def context_parallel_spec(layer_or_block_spec, args):
    """With ``--context-parallel-size`` > 1, Megatron's local core attention (which refuses CP)
    swapped for ``folding.context_parallel``'s, in a layer spec or every layer of a decoder
    block spec; Transformer Engine specs, and CP 1, are left as they are."""
    if getattr(args, "context_parallel_size", 1) <= 1:
        return layer_or_block_spec
    from folding.context_parallel.attention import context_parallel_layer_spec

    spec_from_args(args)  # refuses a cp comm type the plugin's attention does not offer
    if hasattr(layer_or_block_spec, "layer_specs"):
        return dataclasses.replace(layer_or_block_spec, layer_specs=[
            context_parallel_layer_spec(s) for s in layer_or_block_spec.layer_specs])
    return context_parallel_layer_spec(layer_or_block_spec)


def folded_decoder_spec(layer_or_block_spec, args):
    """Megatron's GPT layer spec, or decoder block spec (``.layer_specs``), with every MoE layer
    dispatching through ``FoldedMoELayer``; dense layers are left as they are.

    Experts follow ``--folding-placement`` (Megatron's contiguous layout without it). Raises
    FoldingError, one line naming the problem, for what the folded dispatcher cannot do.
    """
    folding_arguments = folded_layer_arguments(args)
    from folding.megatron import replacement

    replacement.ensure_installed(args)  # a patched script's --folding-replace-interval
    return fold(layer_or_block_spec, *folding_arguments)


def layer_spec_provider(args, base=None) -> Callable:
    """A megatron-core 0.19 ``GPTModelConfig.transformer_layer_spec``: Megatron's default spec
    for the model (or ``base``, a spec given with ``--spec``), folded.

    ``args`` is checked at once, so refusals come before any rank starts.
    """
    folding_arguments = folded_layer_arguments(args)
    from folding.megatron import replacement

    replacement.ensure_installed(args)  # a patched script's --folding-replace-interval

    def provide(model_config, vp_stage=None):
        spec = base
        if spec is None:
            from megatron.training.models.gpt import default_layer_spec

            spec = default_layer_spec(model_config, vp_stage)
        return fold(spec, *folding_arguments)

    return provide
