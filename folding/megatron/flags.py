"""A recipe as Megatron-LM pretrain_gpt.py flags.

Recipe fields are named after Megatron's arguments, so the mapping is one to one; this module
adds what is implied (sequence parallelism with TP > 1, the virtual-pipeline layer count,
recompute settings) and refuses what the flags cannot say (a rank order other than Megatron's
two). Data and tokenizer flags are left to the user: the recipe says which vocabulary size the
model assumes.
"""

from __future__ import annotations

from itertools import groupby
from typing import Dict, List, Optional

from folding.errors import FoldingError
from folding.megatron.mapping import degree_flags
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, Recipe, TrainingSetup


def _number(value) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def layer_freq_expression(pattern: List[int]) -> str:
    """--moe-layer-freq as the Python list expression Megatron evaluates, run-length encoded:
    [0,0,0,1,1] -> ([0]*3+[1]*2)."""
    runs = [f"[{value}]*{len(list(group))}" for value, group in groupby(pattern)]
    return "(" + "+".join(runs) + ")"


def model_flags(arch: ModelArch, seq_length: int) -> List[str]:
    f = ["--num-layers", str(arch.num_layers), "--hidden-size", str(arch.hidden_size),
         "--ffn-hidden-size", str(arch.ffn_hidden_size),
         "--num-attention-heads", str(arch.num_attention_heads)]
    if arch.num_query_groups is not None and not arch.multi_latent_attention:
        f += ["--group-query-attention", "--num-query-groups", str(arch.num_query_groups)]
    if arch.kv_channels is not None:
        f += ["--kv-channels", str(arch.kv_channels)]
    f += ["--seq-length", str(seq_length),
          "--max-position-embeddings", str(arch.max_position_embeddings or seq_length),
          "--position-embedding-type", arch.position_embedding_type]
    if arch.position_embedding_type == "rope":
        f += ["--rotary-base", str(arch.rotary_base)]
    f += ["--normalization", arch.normalization, "--norm-epsilon", _number(arch.norm_epsilon),
          "--attention-dropout", _number(arch.attention_dropout),
          "--hidden-dropout", _number(arch.hidden_dropout),
          "--vocab-size", str(arch.vocab_size),
          "--make-vocab-size-divisible-by", str(arch.make_vocab_size_divisible_by)]
    if arch.swiglu:
        f.append("--swiglu")
    if arch.untie_embeddings_and_output_weights:
        f.append("--untie-embeddings-and-output-weights")
    if not arch.add_bias_linear:
        f.append("--disable-bias-linear")
    if arch.add_qkv_bias:
        f.append("--add-qkv-bias")
    if arch.qk_layernorm:
        f.append("--qk-layernorm")
    if arch.multi_latent_attention:
        f.append("--multi-latent-attention")
        if arch.q_lora_rank is not None:
            f += ["--q-lora-rank", str(arch.q_lora_rank)]
        f += ["--kv-lora-rank", str(arch.kv_lora_rank), "--qk-head-dim", str(arch.qk_head_dim),
              "--qk-pos-emb-head-dim", str(arch.qk_pos_emb_head_dim),
              "--v-head-dim", str(arch.v_head_dim)]
    if arch.mtp_num_layers:
        f += ["--mtp-num-layers", str(arch.mtp_num_layers)]
    if arch.num_experts:
        f += ["--num-experts", str(arch.num_experts), "--moe-router-topk", str(arch.moe_router_topk)]
        if arch.moe_ffn_hidden_size is not None:
            f += ["--moe-ffn-hidden-size", str(arch.moe_ffn_hidden_size)]
        if arch.moe_shared_expert_intermediate_size:
            f += ["--moe-shared-expert-intermediate-size", str(arch.moe_shared_expert_intermediate_size)]
            if arch.moe_shared_expert_gate:
                f.append("--moe-shared-expert-gate")
        if arch.moe_layer_freq != 1:
            freq = arch.moe_layer_freq
            f += ["--moe-layer-freq", str(freq) if isinstance(freq, int) else layer_freq_expression(freq)]
        f += ["--moe-router-load-balancing-type", arch.moe_router_load_balancing_type,
              "--moe-aux-loss-coeff", _number(arch.moe_aux_loss_coeff),
              "--moe-router-score-function", arch.moe_router_score_function]
        if arch.moe_router_pre_softmax:
            f.append("--moe-router-pre-softmax")
        if arch.moe_router_topk_scaling_factor is not None:
            f += ["--moe-router-topk-scaling-factor", _number(arch.moe_router_topk_scaling_factor)]
        if arch.moe_router_num_groups is not None:
            f += ["--moe-router-num-groups", str(arch.moe_router_num_groups),
                  "--moe-router-group-topk", str(arch.moe_router_group_topk)]
        if arch.moe_router_enable_expert_bias:
            f.append("--moe-router-enable-expert-bias")
    return f


def parallel_flags(spec: FoldingSpec, arch: ModelArch, training: TrainingSetup) -> List[str]:
    f = degree_flags(spec, arch.num_layers, moe=bool(arch.num_experts))
    if training.use_distributed_optimizer:
        f.append("--use-distributed-optimizer")
    if training.overlap_grad_reduce:
        f.append("--overlap-grad-reduce")
    if training.overlap_param_gather:
        f.append("--overlap-param-gather")
    return f


def training_flags(training: TrainingSetup, arch: ModelArch, recompute: Optional[str] = None,
                   micro_batch_size: Optional[int] = None) -> List[str]:
    f = ["--micro-batch-size", str(micro_batch_size or training.micro_batch_size),
         "--global-batch-size", str(training.global_batch_size),
         "--train-iters", str(training.train_iters),
         "--lr", _number(training.lr), "--min-lr", _number(training.min_lr),
         "--lr-warmup-iters", str(training.lr_warmup_iters),
         "--lr-decay-style", training.lr_decay_style,
         "--weight-decay", _number(training.weight_decay),
         "--adam-beta1", _number(training.adam_beta1), "--adam-beta2", _number(training.adam_beta2),
         "--adam-eps", _number(training.adam_eps), "--clip-grad", _number(training.clip_grad),
         "--init-method-std", _number(training.init_method_std),
         "--seed", str(training.seed), "--log-interval", str(training.log_interval),
         "--log-throughput"]
    if training.precision in ("bf16", "fp16"):
        f.append(f"--{training.precision}")
    recompute = recompute or training.recompute
    if recompute == "selective":
        f += ["--recompute-granularity", "selective"]
    elif recompute == "full":
        f += ["--recompute-granularity", "full", "--recompute-method", "uniform",
              "--recompute-num-layers", "1"]
    elif recompute != "none":
        raise FoldingError(f"recompute {recompute!r}: use none, selective or full")
    if arch.num_experts:
        f += ["--moe-token-dispatcher-type", training.moe_token_dispatcher_type]
        if training.moe_token_dispatcher_type == "folded":
            raise FoldingError("the folded dispatcher is this project's; pretrain_gpt.py has no flag "
                               "for it (launch through folding's runtime)")
        if training.moe_grouped_gemm:
            f.append("--moe-grouped-gemm")
        if training.moe_expert_capacity_factor is not None:
            f += ["--moe-expert-capacity-factor", _number(training.moe_expert_capacity_factor),
                  "--moe-token-drop-policy", training.moe_token_drop_policy]
            if training.moe_pad_expert_input_to_capacity:
                f.append("--moe-pad-expert-input-to-capacity")
    return f


def megatron_flags(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                   recompute: Optional[str] = None, micro_batch_size: Optional[int] = None) -> List[str]:
    """pretrain_gpt.py flags for a model, training setup and folding."""
    return (model_flags(arch, training.seq_length) + parallel_flags(spec, arch, training)
            + training_flags(training, arch, recompute, micro_batch_size))


def launch_environment(spec: FoldingSpec) -> Dict[str, str]:
    """Environment Megatron asserts at start-up: one CUDA connection so that TP and CP
    communication kernels are scheduled in issue order."""
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if spec.tp > 1 or spec.cp > 1 else {}


def recipe_flags(recipe: Recipe) -> List[str]:
    return megatron_flags(recipe.model, recipe.training, recipe.folding)
