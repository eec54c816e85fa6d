"""Build a Megatron-Core GPT model with MoE layers from a recipe, for one rank of a folding.

Everything here is Megatron's own code: ``TransformerConfig``, the GPT layer specs (the local spec
on CPU, the Transformer Engine spec when TE is installed), ``GPTModel`` chunks (one per virtual
pipeline stage), Megatron's ``DistributedDataParallel`` and ``get_megatron_optimizer``. This
module only translates a recipe and a folding into their arguments. Process groups must already
exist (``folding.megatron.groups.initialize``).
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import List, Optional

import torch

from folding.errors import FoldingError
from folding.megatron.mapping import config_kwargs
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

DISPATCHERS = ("allgather", "alltoall", "folded")


@dataclass(frozen=True)
class MoERouting:
    """How tokens reach experts: the dispatcher and the token-dropping mode."""

    dispatcher: str = "alltoall"
    """Megatron's allgather or alltoall token dispatcher, or this project's folded one."""
    capacity_factor: Optional[float] = None
    """Capacity per expert as a multiple of the even share; None means dropless."""
    drop_policy: str = "probs"
    """probs (drop the lowest routing weights) or position (drop the latest tokens)."""
    pad_to_capacity: bool = False
    """Pad every expert's input to its capacity (needs a capacity factor)."""
    node_dedup: Optional[bool] = None
    """Folded dispatcher: send a token once per remote node, through one rank there that
    forwards it inside its node. None: on when the EP group spans several nodes."""

    def __post_init__(self):
        if self.dispatcher not in DISPATCHERS:
            raise FoldingError(f"dispatcher {self.dispatcher!r} is not one of {', '.join(DISPATCHERS)}")
        if self.drop_policy not in ("probs", "position"):
            raise FoldingError(f"drop policy {self.drop_policy!r} is not probs or position")
        if self.pad_to_capacity and self.capacity_factor is None:
            raise FoldingError("pad-to-capacity needs a capacity factor")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise FoldingError(f"capacity factor must be positive, got {self.capacity_factor}")

    @classmethod
    def from_training(cls, training: TrainingSetup) -> "MoERouting":
        return cls(dispatcher=training.moe_token_dispatcher_type,
                   capacity_factor=training.moe_expert_capacity_factor,
                   drop_policy=training.moe_token_drop_policy,
                   pad_to_capacity=training.moe_pad_expert_input_to_capacity)


def have_transformer_engine() -> bool:
    try:
        importlib.import_module("transformer_engine")
    except Exception:  # noqa: BLE001 - a broken install counts as absent
        return False
    return torch.cuda.is_available()


def _dtype(precision: str) -> torch.dtype:
    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    except KeyError:
        raise FoldingError(f"precision {precision!r} is not fp32, bf16 or fp16") from None


def transformer_config(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                       routing: Optional[MoERouting] = None):
    """Megatron's TransformerConfig for this model, training setup and folding."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    routing = routing or MoERouting.from_training(training)
    if arch.multi_latent_attention:
        raise FoldingError("multi-latent attention models are not built by this module")
    dtype = _dtype(training.precision)
    on_cpu = not torch.cuda.is_available()
    # The folded MoE layer replaces the dispatcher Megatron builds; alltoall is built meanwhile.
    megatron_dispatcher = "alltoall" if routing.dispatcher == "folded" else routing.dispatcher
    moe = {}
    if arch.num_experts:
        moe = dict(
            num_moe_experts=arch.num_experts,
            moe_router_topk=arch.moe_router_topk,
            moe_ffn_hidden_size=arch.expert_ffn_hidden_size,
            moe_shared_expert_intermediate_size=arch.moe_shared_expert_intermediate_size,
            moe_layer_freq=arch.moe_layer_freq,
            moe_router_load_balancing_type=arch.moe_router_load_balancing_type,
            moe_aux_loss_coeff=arch.moe_aux_loss_coeff,
            moe_router_score_function=arch.moe_router_score_function,
            moe_router_pre_softmax=arch.moe_router_pre_softmax,
            moe_token_dispatcher_type=megatron_dispatcher,
            moe_expert_capacity_factor=routing.capacity_factor,
            moe_token_drop_policy=routing.drop_policy,
            moe_pad_expert_input_to_capacity=routing.pad_to_capacity,
            moe_grouped_gemm=training.moe_grouped_gemm and not on_cpu,
            moe_permute_fusion=False,
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        ffn_hidden_size=arch.ffn_hidden_size,
        normalization=arch.normalization,
        gated_linear_unit=arch.swiglu,
        activation_func=torch.nn.functional.silu if arch.swiglu else torch.nn.functional.gelu,
        add_bias_linear=arch.add_bias_linear,
        qk_layernorm=arch.qk_layernorm,
        init_method_std=training.init_method_std,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=on_cpu,
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        cross_entropy_loss_fusion=False,
        **config_kwargs(spec),
        **moe,
    )


def gpt_layer_spec(arch: ModelArch, use_te: Optional[bool] = None, folded: bool = False):
    """Megatron's own GPT layer spec: Transformer Engine's where TE runs, else the local one.

    The folded dispatcher needs one module per local expert (SequentialMLP), so it asks for the
    spec without grouped GEMM.
    """
    from megatron.core.models.gpt import gpt_layer_specs

    if arch.num_experts and any(flag == 0 for flag in arch.moe_layer_pattern()):
        raise FoldingError("models that mix dense and MoE layers are not built on this path yet; "
                           "use moe_layer_freq: 1")
    use_te = have_transformer_engine() if use_te is None else use_te
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=arch.num_experts, moe_grouped_gemm=not folded,
            qk_layernorm=arch.qk_layernorm)
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=arch.num_experts, moe_grouped_gemm=False, qk_layernorm=arch.qk_layernorm,
        normalization=arch.normalization)


def identity_placement(arch: ModelArch, spec: FoldingSpec):
    """Megatron's contiguous expert layout as a placement."""
    from folding.placement.placement import Placement

    return Placement.identity(arch.num_experts, sum(arch.moe_layer_pattern()), spec.ep,
                              spec.gpus_per_node)


def check_placement(placement, arch: ModelArch, spec: FoldingSpec) -> None:
    """Refuse a placement that does not fit the model and folding, naming the problem."""
    placement.validate(num_experts=arch.num_experts, num_layers=sum(arch.moe_layer_pattern()),
                       ep_size=spec.ep)


def build_model_chunks(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                       routing: Optional[MoERouting] = None, config=None,
                       placement=None) -> List[torch.nn.Module]:
    """This rank's GPTModel chunks: one per virtual pipeline stage (one without VPP).

    With the folded dispatcher, experts follow ``placement`` (Megatron's contiguous layout
    when None).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    routing = routing or MoERouting.from_training(training)
    config = config or transformer_config(arch, training, spec, routing)
    folded = routing.dispatcher == "folded"
    layer_spec = gpt_layer_spec(arch, folded=folded)
    if folded:
        from folding.dispatcher.moe_layer import folded_layer_spec

        placement = placement if placement is not None else identity_placement(arch, spec)
        check_placement(placement, arch, spec)
        layer_spec = folded_layer_spec(layer_spec, placement, arch.moe_ordinals(), spec.gpus_per_node,
                                       node_dedup=routing.node_dedup)
    elif placement is not None:
        raise FoldingError("a placement needs the folded dispatcher (--dispatcher folded)")
    if spec.cp > 1:
        from folding.context_parallel.attention import context_parallel_layer_spec

        layer_spec = context_parallel_layer_spec(layer_spec)
    chunks = []
    for vp_stage in range(spec.vpp or 1):
        stage = vp_stage if spec.vpp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=arch.vocab_size,
            max_sequence_length=arch.max_position_embeddings or training.seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            share_embeddings_and_output_weights=not arch.untie_embeddings_and_output_weights,
            position_embedding_type=arch.position_embedding_type,
            rotary_base=arch.rotary_base,
            vp_stage=stage,
        )
        chunks.append(chunk)
    return chunks


def wrap_ddp(chunks: List[torch.nn.Module], use_distributed_optimizer: bool = False):
    """Megatron's DistributedDataParallel around each chunk (the first chunk owns bucketing).

    16-bit chunks first go into Megatron's Float16Module, as Megatron's training does: it casts
    every parameter to the training dtype (the torch norms of the local spec ignore
    ``params_dtype`` otherwise) and the inputs and outputs at the model's edges.
    """
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    chunks = [Float16Module(c.config, c) if (c.config.bf16 or c.config.fp16) else c for c in chunks]

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer, check_for_nan_in_grad=False)
    return [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0)
            for i, c in enumerate(chunks)]


def build_optimizer(ddp_chunks, training: TrainingSetup):
    """Megatron's optimizer (Adam, decoupled weight decay) over the DDP-wrapped chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    dtype = _dtype(training.precision)
    config = OptimizerConfig(
        optimizer="adam", lr=training.lr, min_lr=training.min_lr,
        weight_decay=training.weight_decay, adam_beta1=training.adam_beta1,
        adam_beta2=training.adam_beta2, adam_eps=training.adam_eps,
        clip_grad=training.clip_grad, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        params_dtype=dtype, use_distributed_optimizer=training.use_distributed_optimizer)
    return get_megatron_optimizer(config, ddp_chunks)


def replace_training(training: TrainingSetup, **changes) -> TrainingSetup:
    return dataclasses.replace(training, **{k: v for k, v in changes.items() if v is not None})
