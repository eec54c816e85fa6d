"""Bytes per rank of a folded layout: weights, gradients, optimizer states, activations.

Weights, gradients and optimizer states follow Megatron-Core's DistributedDataParallel and
distributed optimizer:

- Parameters are held in their training dtype; gradients accumulate in an fp32 main-gradient
  buffer (Megatron's default for bf16/fp16 training); Adam keeps fp32 master weights (when the
  parameters are 16-bit) and two fp32 moments (``state_bytes``).
- With the distributed optimizer, master weights and moments are sharded: dense and embedding
  parameters over DP x CP (Megatron reduces their gradients over the data-and-context-parallel
  group), routed-expert parameters over EDP when EP > 1 (``expert_gradients_over_edp``).
- ``exact_weight_memory`` lays the gradient buffers out as Megatron does (parameters in reverse
  registration order, starts padded to 64 elements and buckets to lcm(DP, 128) with the
  distributed optimizer, one buffer per model chunk and per dense/expert group, the shared
  embedding in a bucket of its own) and counts a given data-parallel rank's shard exactly.
  ``weight_memory`` is the same without padding, for the planner.

Activations (``activation_memory``) are the tensors autograd keeps for the backward pass of one
micro-batch, summed over the layers of a model chunk and multiplied by the micro-batches a
pipeline schedule keeps in flight. Top-k routing multiplies the tokens each expert rank holds;
CP divides the sequence; TP divides heads and hidden projections; sequence parallelism divides
norms, residuals and dropout masks. The accounting is per saved tensor (see
``layer_activation_bytes``); it is an estimate of the steady-state peak, not a trace.
``ActivationOptions`` names the kernels: flash or unfused attention, and Megatron's fused
element-wise kernels (GPU training) or the local spec's unfused ones (the CPU runtime). The CPU
accounting is checked against the tensors real folded models save (``folding.testing.memory_measure``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from folding.errors import FoldingError
from folding.layout.parameters import (ParamCounts, ParameterModel, ParamTensor,
                                       expert_gradients_over_edp, padded_vocab_size,
                                       rank_parameters)
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

# Bytes of an activation element. FP8 training (Transformer Engine) casts GEMM operands to FP8
# inside each layer but keeps activations, weights and gradients in BF16: 2 bytes, as BF16.
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 2}
GiB = 1024 ** 3


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter element of each kind of training state."""

    param: int
    """The model weight in its training dtype."""
    grad: int
    """The main-gradient buffer (fp32 by default, as Megatron accumulates and reduces in fp32)."""
    optimizer: int
    """fp32 master weight (for 16-bit training) and Adam's two fp32 moments, before sharding."""


def state_bytes(precision: str) -> StateBytes:
    """The one place that says how many bytes each training state takes per element."""
    if precision not in DTYPE_BYTES:
        raise FoldingError(f"unknown precision {precision!r}; use bf16, fp8, fp16 or fp32")
    if precision == "fp32":
        # The optimizer updates fp32 weights in place: only the two moments are extra.
        return StateBytes(param=4, grad=4, optimizer=8)
    # bf16, fp16, and fp8 (BF16 weights with FP8 GEMMs; no --fp8-param-gather)
    return StateBytes(param=2, grad=4, optimizer=12)


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of weights, gradients and optimizer states on one rank."""

    params: int = 0
    grads: int = 0
    optimizer: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer

    def __add__(self, other: "WeightMemory") -> "WeightMemory":
        return WeightMemory(self.params + other.params, self.grads + other.grads,
                            self.optimizer + other.optimizer)


def sharding_degrees(spec: FoldingSpec) -> Tuple[int, int]:
    """(dense, expert) data-parallel degrees the gradients are reduced and sharded over."""
    dense = spec.dp * spec.cp
    return dense, (spec.edp if expert_gradients_over_edp(spec) else dense)


def weight_memory(counts: ParamCounts, spec: FoldingSpec, training: TrainingSetup) -> WeightMemory:
    """Weights, gradients and optimizer states of ``counts`` parameters, without buffer padding
    (``exact_weight_memory`` adds it; the difference is below 64 elements per tensor plus one
    bucket's rounding)."""
    b = state_bytes(training.precision)
    total = counts.total
    dense_dp, expert_dp = sharding_degrees(spec)
    if training.use_distributed_optimizer:
        optimizer = b.optimizer * (math.ceil((counts.dense + counts.embedding) / dense_dp)
                                   + math.ceil(counts.expert / expert_dp))
    else:
        optimizer = b.optimizer * total
    return WeightMemory(params=b.param * total, grads=b.grad * total, optimizer=optimizer)


# ----------------------------------------------------------------------------- exact buffers
DDP_DEFAULT_BUCKET_ELEMENTS = 40_000_000


@dataclass(frozen=True)
class GradBuffer:
    """One of Megatron's contiguous gradient buffers, laid out as _ParamAndGradBuffer does."""

    param_ranges: Tuple[Tuple[int, int], ...]
    """[start, end) of each parameter in the buffer."""
    bucket_ranges: Tuple[Tuple[int, int], ...]
    """[start, end) of each bucket (padded when the optimizer is distributed)."""
    data_parallel_size: int
    group: str = "dp_cp"
    """The group that reduces it: dp_cp (attention mesh) or edp (MoE mesh)."""

    @property
    def numel(self) -> int:
        return self.bucket_ranges[-1][1] if self.bucket_ranges else 0

    def shard_elements(self, dp_rank: int) -> int:
        """Parameter elements (padding excluded) in ``dp_rank``'s shard of every bucket."""
        total = 0
        for start, end in self.bucket_ranges:
            size = (end - start) // self.data_parallel_size
            lo, hi = start + dp_rank * size, start + (dp_rank + 1) * size
            total += sum(max(0, min(hi, e) - max(lo, s)) for s, e in self.param_ranges)
        return total


def grad_buffer_layout(params: Sequence[ParamTensor], data_parallel_size: int,
                       distributed_optimizer: bool, bucket_size: Optional[int],
                       group: str = "dp_cp") -> GradBuffer:
    """Megatron's buffer layout for ``params`` given in registration order.

    Parameters are placed in reverse order (roughly the order backward produces gradients);
    with the distributed optimizer each parameter starts at a multiple of 64 elements, each
    bucket ends at a multiple of lcm(DP, 128), and a shared embedding gets a bucket of its own.
    """
    def pad(n: int, divisor: int) -> int:
        return -(-n // divisor) * divisor

    bucket_divisor = math.lcm(data_parallel_size, 128)
    ranges: List[Tuple[int, int]] = []
    buckets: List[Tuple[int, int]] = []
    start = bucket_start = 0
    open_bucket = False
    end = 0

    def close(param_end: int) -> int:
        nonlocal bucket_start, open_bucket
        bucket_end = pad(param_end, bucket_divisor) if distributed_optimizer else param_end
        buckets.append((bucket_start, bucket_end))
        bucket_start = bucket_end
        open_bucket = False
        return bucket_end

    for p in reversed(params):
        if distributed_optimizer:
            start = pad(start, 64)
        own_bucket = p.shared_embedding and distributed_optimizer
        if own_bucket and open_bucket:
            start = close(start)
        end = start + p.numel
        ranges.append((start, end))
        open_bucket = True
        if (bucket_size is not None and end - bucket_start >= bucket_size) or own_bucket:
            start = close(end)
        else:
            start = end
    if open_bucket:
        close(end)
    return GradBuffer(tuple(ranges), tuple(buckets), data_parallel_size, group)


def ddp_bucket_size(training: TrainingSetup, spec: FoldingSpec, pp_rank: int, chunk: int,
                    bucket_elements: Optional[int] = None) -> Optional[int]:
    """Megatron buckets gradients only with overlap_grad_reduce, on the first pipeline stage
    and the first model chunk; elsewhere one bucket holds the whole buffer. ``bucket_elements``
    replaces Megatron's default size (--ddp-bucket-size)."""
    if not training.overlap_grad_reduce or pp_rank > 0 or chunk > 0:
        return None
    return bucket_elements or max(DDP_DEFAULT_BUCKET_ELEMENTS, 1_000_000 * spec.dp * spec.cp)


def rank_grad_buffers(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                      pp_rank: int, bucket_elements: Optional[int] = None) -> List[GradBuffer]:
    """Every gradient buffer of a pipeline rank: per model chunk, one for parameters reduced
    over DP x CP and one for expert parameters reduced over EDP (all parameters in the training
    dtype, as after Megatron's Float16Module)."""
    dense_dp, expert_dp = sharding_degrees(spec)
    buffers = []
    for chunk in range(spec.vpp or 1):
        params = rank_parameters(arch, spec, pp_rank, chunk if spec.vpp else None,
                                 max_sequence_length=training.seq_length)
        bucket = ddp_bucket_size(training, spec, pp_rank, chunk, bucket_elements)
        over_edp = [p for p in params if p.kind == "expert" and expert_gradients_over_edp(spec)]
        over_dp = [p for p in params if not (p.kind == "expert" and expert_gradients_over_edp(spec))]
        for params_of_group, degree, group in ((over_dp, dense_dp, "dp_cp"),
                                               (over_edp, expert_dp, "edp")):
            if params_of_group:
                buffers.append(grad_buffer_layout(params_of_group, degree,
                                                  training.use_distributed_optimizer, bucket, group))
    return buffers


def exact_weight_memory(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                        pp_rank: int = 0, rank: Optional[int] = None,
                        bucket_elements: Optional[int] = None) -> WeightMemory:
    """Bytes of parameters, gradients and optimizer states Megatron allocates on one rank.

    ``rank`` (a global rank of stage ``pp_rank``) picks whose optimizer shard is counted, by its
    position in its DP x CP and EDP groups; None takes the largest shard of each buffer.
    """
    b = state_bytes(training.precision)
    total = WeightMemory()
    for buffer in rank_grad_buffers(arch, training, spec, pp_rank, bucket_elements):
        real = sum(end - start for start, end in buffer.param_ranges)
        if training.use_distributed_optimizer:
            if rank is None:
                ranks = range(buffer.data_parallel_size)
            else:
                mesh = "moe" if buffer.group == "edp" else "attention"
                ranks = [spec.group_of(rank, mesh, buffer.group).index(rank)]
            shard = max(buffer.shard_elements(r) for r in ranks)
            # The distributed optimizer re-maps parameters into a padded buffer like the grads.
            total = total + WeightMemory(b.param * buffer.numel, b.grad * buffer.numel,
                                         b.optimizer * shard)
        else:
            total = total + WeightMemory(b.param * real, b.grad * buffer.numel, b.optimizer * real)
    return total


# ----------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class ActivationOptions:
    """What the activation estimate assumes beyond the recipe."""

    attention_kernel: str = "flash"
    """flash (Transformer Engine / flash-attn on GPUs: no seq x seq tensor kept) or unfused
    (Megatron's local DotProductAttention, used on the CPU: softmax probabilities kept)."""
    attention_softmax_in_fp32: bool = False
    """Megatron's --attention-softmax-in-fp32 (unfused kernel only)."""
    moe_load_imbalance: float = 1.0
    """Tokens on the busiest expert rank over the even share, for dropless routing."""
    recompute: Optional[str] = None
    """Override the recipe's recompute (none, selective, full)."""
    fused_elementwise: bool = True
    """Megatron's fused element-wise kernels, as GPU training runs them: Transformer Engine (or
    Apex) norms, --bias-swiglu-fusion, --rope-fusion and --masked-softmax-fusion. False is the
    local layer spec on the CPU (torch norms; SwiGLU, RoPE and the masked softmax unfused), whose
    intermediate results autograd keeps as well (see ``_norm_bytes``, ``_mlp_bytes`` and
    ``attention_activation_bytes``)."""


@dataclass(frozen=True)
class TokenShape:
    """How many tokens a rank holds in each region of a layer, for one micro-batch."""

    tokens: int
    """Tokens of the local sequence shard (seq x micro-batch / CP): attention and MLP GEMMs."""
    sp_tokens: int
    """Tokens in sequence-parallel regions (norms, residuals, dropout): tokens / TP with SP."""
    expert_tokens: int
    """Token copies the busiest expert rank processes: top-k, ETP gathering, capacity."""


def token_shape(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                options: ActivationOptions = ActivationOptions(),
                micro_batch_size: Optional[int] = None) -> TokenShape:
    mbs = micro_batch_size or training.micro_batch_size
    tokens = training.seq_length * mbs // spec.cp
    sp_tokens = tokens // spec.tp if spec.sequence_parallel else tokens
    expert_tokens = 0
    if arch.num_experts:
        # Tokens enter the MoE layer sharded like the sequence-parallel region; each is copied
        # to top-k experts; an expert rank gathers the tokens of its ETP group.
        routed = sp_tokens * arch.moe_router_topk * spec.etp
        cf = training.moe_expert_capacity_factor
        if cf is None:
            expert_tokens = math.ceil(routed * options.moe_load_imbalance)
        else:
            capacity = math.ceil(routed * cf)
            expert_tokens = capacity if training.moe_pad_expert_input_to_capacity else min(
                capacity, math.ceil(routed * options.moe_load_imbalance))
    return TokenShape(tokens, sp_tokens, expert_tokens)


def _norm_bytes(arch: ModelArch, tokens: int, a: int, fused: bool = True) -> int:
    """A norm keeps its input and fp32 statistics per token (LayerNorm: mean and rstd).

    Unfused, torch's RMSNorm (the local spec's) is a composite that computes in fp32 and keeps
    the fp32 input and the normalised input x * rstd for the weight multiply, plus rstd; torch's
    LayerNorm is one kernel that keeps what the fused norms keep.
    """
    if not fused and arch.normalization == "RMSNorm":
        return tokens * (2 * arch.hidden_size * 4 + 4)
    stats = 2 if arch.normalization == "LayerNorm" else 1
    return tokens * (arch.hidden_size * a + 4 * stats)


def attention_activation_bytes(arch: ModelArch, shape: TokenShape, spec: FoldingSpec, a: int,
                               recompute: str, options: ActivationOptions, seq_length: int,
                               micro_batch_size: int) -> int:
    """Input norm, projections and core attention of one layer."""
    h, tp = arch.hidden_size, spec.tp
    T, t = shape.tokens, shape.sp_tokens
    n = arch.num_attention_heads
    if arch.multi_latent_attention:
        q_dim = n * (arch.qk_head_dim + arch.qk_pos_emb_head_dim)
        k_dim = q_dim
        v_dim = n * arch.v_head_dim
        # low-rank latents feed the up-projections and stay whole on each TP rank
        latents = T * ((arch.q_lora_rank or 0) + arch.kv_lora_rank) * a
        value_head_dim = arch.v_head_dim
    else:
        q_dim = n * arch.head_dim
        k_dim = v_dim = arch.query_groups * arch.head_dim
        latents = 0
        value_head_dim = arch.head_dim
    fused = options.fused_elementwise
    out = _norm_bytes(arch, t, a, fused)        # input norm
    out += t * h * a + latents                   # QKV input (kept sequence-sharded)
    local_sequence = seq_length // spec.cp
    if not fused and arch.position_embedding_type == "rope":
        # Unfused RoPE computes cos and sin of the frequencies for queries and for keys and keeps
        # all four, [sequence, rotary dim], for the backward multiply.
        rotary_dim = arch.qk_pos_emb_head_dim if arch.multi_latent_attention else arch.head_dim
        out += 4 * local_sequence * rotary_dim * a
    heads_local = n // tp
    if options.attention_kernel == "flash" or recompute == "selective":
        out += T * (q_dim + k_dim + v_dim) // tp * a          # q, k, v kept by the kernel
        if recompute != "selective":
            out += T * heads_local * 4                         # softmax log-sum-exp
    else:
        # Megatron's local attention expands K and V to every query head before the matmuls.
        out += T * (q_dim + 2 * (q_dim if not arch.multi_latent_attention else v_dim)) // tp * a
        scores = micro_batch_size * heads_local * local_sequence * local_sequence
        softmax = 4 if options.attention_softmax_in_fp32 else a
        cast = options.attention_softmax_in_fp32 and a != 4
        dropout = arch.attention_dropout > 0
        out += scores * (softmax + (a if cast or dropout else 0) + (1 if dropout else 0))
        if not fused:
            # The unfused masked softmax builds the boolean causal mask in every layer and
            # masked_fill keeps it.
            out += local_sequence * local_sequence
    out += T * n * value_head_dim // tp * a      # attention output = output projection input
    if arch.hidden_dropout > 0:
        out += t * h                             # residual dropout mask
    return out


def _mlp_bytes(arch: ModelArch, tokens: int, ffn: int, split: int, a: int, fused: bool = True,
               weighted: bool = False) -> int:
    """fc1 output (kept by the activation function) and activation output (fc2's input).

    Unfused SwiGLU keeps, besides fc1's output, silu(x1) and x2 + glu_linear_offset (operands of
    their product). Routed experts (``weighted``) multiply the activation by the token's router
    probability before fc2 (megatron-core 0.16 and later apply it there, not at the combine):
    the fused weighted SwiGLU keeps the probability with its input; otherwise the multiply keeps
    the activation output and the probability, and fc2 keeps the weighted copy.
    """
    gated = 2 if arch.swiglu else 1
    kept = gated + 1
    if arch.swiglu and not fused:
        kept += 2
    if weighted and not (arch.swiglu and fused):
        kept += 1
    return tokens * ffn * kept // split * a + (tokens * 4 if weighted else 0)


def mlp_activation_bytes(arch: ModelArch, shape: TokenShape, spec: FoldingSpec, a: int,
                         is_moe: bool, options: ActivationOptions = ActivationOptions()) -> int:
    """Pre-MLP norm, then the dense MLP or the router, routed experts and shared experts.

    The combine keeps no expert outputs: the experts apply the router probabilities before fc2
    and the unpermute only scatters (it keeps its indices, counted with the router's).
    """
    h = arch.hidden_size
    T, t = shape.tokens, shape.sp_tokens
    fused = options.fused_elementwise
    out = _norm_bytes(arch, t, a, fused) + t * h * a   # norm input; its output feeds fc1 / the router
    if not is_moe:
        out += _mlp_bytes(arch, T, arch.ffn_hidden_size, spec.tp, a, fused)
    else:
        k, E = arch.moe_router_topk, arch.num_experts
        out += t * E * 4 * 2 + t * k * 8         # fp32 router scores and probabilities, top-k indices
        n = shape.expert_tokens
        out += n * h * a                         # expert fc1 inputs
        out += _mlp_bytes(arch, n, arch.expert_ffn_hidden_size, spec.etp, a, fused, weighted=True)
        if arch.moe_shared_expert_intermediate_size:
            out += _mlp_bytes(arch, T, arch.moe_shared_expert_intermediate_size, spec.tp, a, fused)
    if arch.hidden_dropout > 0:
        out += t * h
    return out


def layer_activation_bytes(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                           is_moe: bool, options: ActivationOptions = ActivationOptions(),
                           micro_batch_size: Optional[int] = None,
                           recompute: Optional[str] = None) -> int:
    """Bytes one transformer layer keeps for backward, for one micro-batch on one rank."""
    a = DTYPE_BYTES[training.precision]
    mbs = micro_batch_size or training.micro_batch_size
    recompute = recompute or options.recompute or training.recompute
    shape = token_shape(arch, training, spec, options, mbs)
    if recompute == "full":
        return shape.sp_tokens * arch.hidden_size * a     # only the layer input is checkpointed
    return (attention_activation_bytes(arch, shape, spec, a, recompute, options,
                                       training.seq_length, mbs)
            + mlp_activation_bytes(arch, shape, spec, a, is_moe, options))


def dispatcher_buffer_bytes(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                            options: ActivationOptions = ActivationOptions(),
                            micro_batch_size: Optional[int] = None) -> int:
    """Transient token buffers of one MoE layer's dispatch and combine (freed after the layer):
    permuted tokens and the combine input at the source, received, ETP-gathered and expert
    output tokens at the expert rank."""
    if not arch.num_experts:
        return 0
    a = DTYPE_BYTES[training.precision]
    shape = token_shape(arch, training, spec, options, micro_batch_size)
    return (2 * shape.sp_tokens * arch.moe_router_topk + 3 * shape.expert_tokens) * arch.hidden_size * a


class ActivationModel:
    """Activation bytes of one architecture and training setup, memoised per split.

    Layer activations depend on the folding only through TP, CP, ETP, EP and sequence
    parallelism; the planner asks for thousands of foldings, so each combination is computed once.
    """

    def __init__(self, arch: ModelArch, training: TrainingSetup,
                 options: ActivationOptions = ActivationOptions()):
        self.arch, self.training, self.options = arch, training, options
        self._cache: Dict[tuple, int] = {}

    def _key(self, what: str, spec: FoldingSpec, mbs: int, *extra) -> tuple:
        return (what, spec.tp, spec.cp, spec.etp, spec.ep, spec.sequence_parallel, mbs) + extra

    def layer(self, spec: FoldingSpec, is_moe: bool, mbs: int, recompute: str) -> int:
        key = self._key("layer", spec, mbs, is_moe, recompute)
        if key not in self._cache:
            self._cache[key] = layer_activation_bytes(self.arch, self.training, spec, is_moe,
                                                      self.options, mbs, recompute)
        return self._cache[key]

    def dispatcher(self, spec: FoldingSpec, mbs: int) -> int:
        key = self._key("dispatcher", spec, mbs)
        if key not in self._cache:
            self._cache[key] = dispatcher_buffer_bytes(self.arch, self.training, spec, self.options, mbs)
        return self._cache[key]

    def shape(self, spec: FoldingSpec, mbs: int) -> TokenShape:
        key = self._key("shape", spec, mbs)
        if key not in self._cache:
            self._cache[key] = token_shape(self.arch, self.training, spec, self.options, mbs)
        return self._cache[key]


def in_flight_micro_batches(pp: int, vpp: Optional[int], pp_rank: int, num_microbatches: int) -> int:
    """Model-chunk micro-batches whose activations a rank holds at its peak (Megatron's
    schedules: warm-up forwards plus one): 1F1B keeps PP - rank; the interleaved schedule keeps
    2 (PP - rank - 1) + (VPP - 1) PP + 1 chunk micro-batches of 1/VPP of the layers each."""
    if pp == 1:
        return 1
    if not vpp:
        return min(pp - pp_rank, num_microbatches)
    return min((pp - pp_rank - 1) * 2 + (vpp - 1) * pp + 1, num_microbatches * vpp)


def num_microbatches(training: TrainingSetup, spec: FoldingSpec,
                     micro_batch_size: Optional[int] = None) -> int:
    mbs = micro_batch_size or training.micro_batch_size
    per_step = mbs * spec.dp
    if training.global_batch_size % per_step:
        raise FoldingError(f"global_batch_size={training.global_batch_size} is not divisible by "
                           f"micro_batch_size={mbs} x DP={spec.dp}")
    return training.global_batch_size // per_step


def output_activation_bytes(arch: ModelArch, shape: TokenShape, spec: FoldingSpec, a: int,
                            fused: bool = True) -> int:
    """Final norm, output-layer input and the fp32 softmax the vocabulary-parallel cross
    entropy keeps, per output head."""
    vocab = padded_vocab_size(arch, spec.tp) // spec.tp
    return _norm_bytes(arch, shape.sp_tokens, a, fused) + shape.sp_tokens * arch.hidden_size * a + \
        shape.tokens * vocab * 4


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one rank at its peak."""

    weights: WeightMemory
    activations: int
    """Saved activations of every in-flight micro-batch."""
    transient: int
    """The largest short-lived working set on top: dispatcher buffers, logits, a recomputed layer."""
    in_flight: int
    """Model-chunk micro-batches in flight."""
    pp_rank: int
    details: Dict[str, int] = field(default_factory=dict, compare=False)

    @property
    def total(self) -> int:
        return self.weights.total + self.activations + self.transient


def stage_memory(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec, pp_rank: int,
                 options: ActivationOptions = ActivationOptions(),
                 micro_batch_size: Optional[int] = None, recompute: Optional[str] = None,
                 parameter_model: Optional[ParameterModel] = None, exact: bool = False,
                 activation_model: Optional[ActivationModel] = None) -> RankMemory:
    """Peak memory of the ranks of pipeline stage ``pp_rank``."""
    mbs = micro_batch_size or training.micro_batch_size
    recompute = recompute or options.recompute or training.recompute
    a = DTYPE_BYTES[training.precision]
    model = parameter_model or ParameterModel(arch, training.seq_length)
    acts = activation_model or ActivationModel(arch, training, options)
    if exact:
        weights = exact_weight_memory(arch, training, spec, pp_rank)
    else:
        weights = weight_memory(model.rank_counts(spec, pp_rank), spec, training)

    pattern = model.pattern
    chunks = spec.vpp or 1
    moe, dense = model.rank_layer_kinds(spec.pp, spec.vpp, pp_rank)
    all_chunks = (moe * (acts.layer(spec, True, mbs, recompute) if moe else 0)
                  + dense * (acts.layer(spec, False, mbs, recompute) if dense else 0))
    m = num_microbatches(training, spec, mbs)
    in_flight = in_flight_micro_batches(spec.pp, spec.vpp, pp_rank, m)
    # Chunk micro-batches in flight are spread over the chunks; the average chunk is exact for
    # equal chunks, which the even layer split gives except where MoE patterns differ.
    activations = in_flight * all_chunks // chunks

    shape = acts.shape(spec, mbs)
    # The first model chunk of rank 0 embeds; the last chunk of the last rank holds the output.
    holds_embedding, holds_output = pp_rank == 0, pp_rank == spec.pp - 1
    details = {"layers": activations}
    if holds_embedding:
        embedding = shape.tokens * 8 + (shape.sp_tokens * arch.hidden_size
                                        if arch.hidden_dropout > 0 else 0)
        details["embedding"] = embedding * in_flight_micro_batches(spec.pp, None, pp_rank, m)
        activations += details["embedding"]
    transient = acts.dispatcher(spec, mbs)
    if recompute == "full":
        # Backward re-runs one layer's forward and holds its full activations meanwhile.
        transient += max(acts.layer(spec, bool(i), mbs, "none") for i in set(pattern))
    if holds_output:
        heads = 1 + (arch.mtp_num_layers or 0)
        details["output"] = heads * output_activation_bytes(arch, shape, spec, a,
                                                            options.fused_elementwise)
        if arch.mtp_num_layers:
            details["output"] += arch.mtp_num_layers * (
                acts.layer(spec, bool(pattern[-1]), mbs, recompute)
                + 3 * shape.sp_tokens * arch.hidden_size * a)
        activations += details["output"]
        # Logits in the training dtype and their fp32 copy exist together while the loss is formed.
        vocab = padded_vocab_size(arch, spec.tp) // spec.tp
        transient = max(transient, shape.tokens * vocab * (a + 4))
    details["transient"] = transient
    return RankMemory(weights=weights, activations=activations, transient=transient,
                      in_flight=in_flight, pp_rank=pp_rank, details=details)


def peak_memory(arch: ModelArch, training: TrainingSetup, spec: FoldingSpec,
                options: ActivationOptions = ActivationOptions(),
                micro_batch_size: Optional[int] = None, recompute: Optional[str] = None,
                parameter_model: Optional[ParameterModel] = None, exact: bool = False,
                activation_model: Optional[ActivationModel] = None,
                stages: Optional[Sequence[int]] = None) -> RankMemory:
    """The pipeline stage whose ranks need the most memory (of ``stages``, default all)."""
    model = parameter_model or ParameterModel(arch, training.seq_length)
    acts = activation_model or ActivationModel(arch, training, options)
    return max((stage_memory(arch, training, spec, r, options, micro_batch_size, recompute,
                             model, exact, acts) for r in (stages or range(spec.pp))),
               key=lambda m: m.total)
