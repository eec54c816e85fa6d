"""Predicted time of one training iteration for a folding: roofline compute plus alpha-beta
communication over Megatron's 1F1B or interleaved pipeline schedule.

Per layer and micro-batch, each GEMM a rank runs costs the larger of its FLOPs at the GPU's
achievable GEMM rate and its operand traffic at HBM bandwidth; the backward pass runs the same
GEMMs twice (input and weight gradients). Fused attention runs at its own achievable rate.
Element-wise work (norms, activations, permutations) is charged as memory traffic: three passes
over the bytes the layer saves for backward, plus a forward and a backward pass over the MoE
dispatcher's token buffers. Recomputation adds forward work: the whole layer
(full) or core attention (selective).

Communication, per layer and micro-batch, forward and backward:

- TP: all-gather before and reduce-scatter after each sequence-parallel block (attention, dense
  MLP, shared experts): four collectives of the layer's hidden states each way. Not overlapped.
- CP: the bytes of ``folding.cost.context_parallel`` for the folding's ``cp_comm_type``
  (``_cp_time``). The p2p ring overlaps each hop with one block of core attention; only the
  excess shows, plus the latency of the first hop and, backward, the last dK/dV hop home.
  all_gather and a2a are not overlapped. Recomputing core attention repeats the forward's.
- EP: the token all-to-all for dispatch and combine, forward and backward; with ETP > 1 the
  expert rank also all-gathers and reduce-scatters tokens over ETP. Not overlapped.
- PP: (M x VPP + PP - 1) chunk slots of the slowest stage (the bubble is (PP - 1) / VPP stage
  times); activations and gradients cross stage boundaries, exposed with 1F1B, overlapped (only
  latency shows) with the interleaved schedule.
- DP / EDP: reduce-scatter of fp32 gradients and all-gather of parameters (distributed
  optimizer) or an all-reduce, hidden behind the last backward / first forward when the recipe
  overlaps them.

The optimizer step is charged as HBM traffic over the rank's shard.

What a real cluster reaches of the datasheet rates comes from a ``Calibration``
(``folding.cost.calibration``): GEMM efficiency by shape, attention efficiency, FP8 GEMM
efficiency, all-to-all bandwidth inside and across nodes, the routing imbalance of the busiest
EP rank, per-layer and per-MoE-layer overheads, and CP ring overlap. Without one the model is
the uncalibrated roofline of the profile's assumptions (``Calibration.from_profile``);
``folding plan`` and ``folding predict`` use the stored fit ``FITTED``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from folding.cost import comm
from folding.cost.calibration import Calibration
from folding.cost.context_parallel import exchange_bytes
from folding.cost.flops import layer_flops, training_flops
from folding.cost.hardware import HardwareProfile
from folding.errors import FoldingError
from folding.cost.memory import (DTYPE_BYTES, ActivationModel, num_microbatches, sharding_degrees,
                                 state_bytes)
from folding.layout.parameters import ParameterModel, padded_vocab_size
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

# Bytes the optimizer step moves per owned element: read fp32 master weight, two moments and the
# gradient; write weight, moments and the 16-bit parameter copy.
OPTIMIZER_BYTES_PER_ELEMENT = 4 * 4 + 3 * 4 + 2
# Passes of element-wise work over the bytes a layer saves (forward write, backward read, and
# the gradient of each written once).
ELEMENTWISE_PASSES = 3


@dataclass(frozen=True)
class LayerTime:
    """Seconds one layer takes on one rank for one micro-batch, forward and backward."""

    compute: float
    tp: float
    cp: float
    ep: float
    overhead: float = 0.0
    """Launch and synchronisation time no rate explains (the calibration's overheads)."""

    @property
    def total(self) -> float:
        return self.compute + self.tp + self.cp + self.ep + self.overhead

    def __add__(self, other: "LayerTime") -> "LayerTime":
        return LayerTime(self.compute + other.compute, self.tp + other.tp, self.cp + other.cp,
                         self.ep + other.ep, self.overhead + other.overhead)

    def scaled(self, factor: float) -> "LayerTime":
        return LayerTime(self.compute * factor, self.tp * factor, self.cp * factor, self.ep * factor,
                         self.overhead * factor)


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds of one iteration and where they go."""

    total: float
    pipeline: float
    """Micro-batches through the slowest stage, bubble included."""
    bubble: float
    p2p: float
    dp: float
    optimizer: float
    layers: LayerTime
    """Per micro-batch on the slowest stage."""
    model_flops: int
    """Megatron-convention FLOPs of the iteration."""
    world_size: int
    peak_tflops: float
    heads: float = 0.0
    """Per micro-batch on the slowest stage: embedding and output layers."""

    @property
    def tflops_per_gpu(self) -> float:
        return self.model_flops / (self.total * 1e12 * self.world_size)

    @property
    def mfu(self) -> float:
        return self.tflops_per_gpu / self.peak_tflops

    def breakdown(self) -> Dict[str, float]:
        return {"pipeline": self.pipeline, "bubble": self.bubble, "p2p": self.p2p, "dp": self.dp,
                "optimizer": self.optimizer, "compute_per_microbatch": self.layers.compute,
                "tp_per_microbatch": self.layers.tp, "cp_per_microbatch": self.layers.cp,
                "ep_per_microbatch": self.layers.ep,
                "overhead_per_microbatch": self.layers.overhead}


class StepTimeModel:
    """Step time of foldings of one model, training setup and GPU; per-layer costs memoised."""

    def __init__(self, arch: ModelArch, training: TrainingSetup, hw: HardwareProfile,
                 parameter_model: Optional[ParameterModel] = None,
                 activation_model: Optional[ActivationModel] = None,
                 calibration: Optional[Calibration] = None, ep_overlap: bool = False,
                 force_balance: bool = False):
        self.arch, self.training, self.hw = arch, training, hw
        self.cal = calibration or Calibration.from_profile(hw)
        self.force_balance = force_balance
        """Megatron's --moe-router-force-load-balancing (benchmarks): every expert receives the
        mean number of tokens, so the calibration's routing imbalance does not apply."""
        self.ep_overlap = ep_overlap
        """Megatron's --overlap-moe-expert-parallel-comm: one micro-batch's all-to-all runs
        under another's compute (1F1B with merged forward and backward), so only what exceeds
        the layer's compute shows."""
        gemm_peak = hw.peak_tflops
        self._fp8 = training.precision == "fp8"
        if self._fp8:
            if not hw.peak_fp8_tflops:
                raise FoldingError(f"{hw.name} has no FP8 tensor cores: use --precision bf16")
            gemm_peak = hw.peak_fp8_tflops * self.cal.fp8_gemm_efficiency
        self._gemm_rate = gemm_peak * 1e12 * self.cal.gemm_efficiency
        self.params = parameter_model or ParameterModel(arch, training.seq_length)
        self.acts = activation_model or ActivationModel(arch, training)
        self.a = DTYPE_BYTES[training.precision]
        self.flops = layer_flops(arch)
        self._layers: Dict[tuple, LayerTime] = {}
        self._model_flops: Dict[int, int] = {}

    # ------------------------------------------------------------------------- compute
    def _gemm(self, m: float, n: float, k: float, count: int = 1) -> float:
        """Forward time of ``count`` GEMMs (m x k) @ (k x n): roofline of FLOPs and traffic."""
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        rate = self._gemm_rate
        half = self.cal.gemm_half_dim
        if half:
            smallest = min(m, n, k)
            rate *= smallest / (smallest + half)
        flops = 2.0 * m * n * k / rate
        traffic = (m * k + k * n + m * n) * self.a / (self.hw.hbm_gbps * 1e9)
        cast = 0.0
        if self._fp8:  # the operands' casts to FP8 run as separate memory-bound kernels
            cast = self.cal.fp8_cast_bytes * (m * k + k * n) / (self.hw.hbm_gbps * 1e9)
        return count * (max(flops, traffic) + cast)

    def _attention_forward(self, T: float, tp: int) -> float:
        arch, h = self.arch, self.arch.hidden_size
        n = arch.num_attention_heads
        if arch.multi_latent_attention:
            qk = arch.qk_head_dim + arch.qk_pos_emb_head_dim
            t = self._gemm(T, arch.kv_lora_rank + arch.qk_pos_emb_head_dim, h)  # whole on each TP rank
            t += self._gemm(T, n * (arch.qk_head_dim + arch.v_head_dim) / tp, arch.kv_lora_rank)
            if arch.q_lora_rank is None:
                t += self._gemm(T, n * qk / tp, h)
            else:
                t += self._gemm(T, arch.q_lora_rank, h) + self._gemm(T, n * qk / tp, arch.q_lora_rank)
            return t + self._gemm(T, h, n * arch.v_head_dim / tp)
        q, kv = n * arch.head_dim, arch.query_groups * arch.head_dim
        return self._gemm(T, (q + 2 * kv) / tp, h) + self._gemm(T, h, q / tp)

    def _mlp_forward(self, tokens: float, ffn: int, split: int, experts: int = 1) -> float:
        gated = 2 if self.arch.swiglu else 1
        h = self.arch.hidden_size
        return (self._gemm(tokens, ffn * gated / split, h, experts)
                + self._gemm(tokens, h, ffn / split, experts))

    def layer_time(self, spec: FoldingSpec, spans: Dict, is_moe: bool, mbs: int,
                   recompute: str) -> LayerTime:
        key = (spec.tp, spec.cp, spec.etp, spec.ep, spec.dp, spec.edp, spec.pp, spec.order,
               spec.gpus_per_node, spec.cp_comm_type, is_moe, mbs, recompute)
        if key not in self._layers:
            self._layers[key] = self._layer_time(spec, spans, is_moe, mbs, recompute)
        return self._layers[key]

    def _layer_time(self, spec: FoldingSpec, spans: Dict, is_moe: bool, mbs: int,
                    recompute: str) -> LayerTime:
        arch, hw, a, h = self.arch, self.hw, self.a, self.arch.hidden_size
        shape = self.acts.shape(spec, mbs)
        T, t = shape.tokens, shape.sp_tokens
        tp, cp = spec.tp, spec.cp
        seq = self.training.seq_length

        attention = self._attention_forward(T, tp)
        # Megatron's causal core-attention FLOPs (forward third) for this rank's queries, on
        # key blocks of seq / (2 CP) tokens with context parallelism (load-balanced halves).
        block = seq / (2 * cp) if cp > 1 else seq
        efficiency = self.cal.attention_efficiency * block / (block + hw.attention_half_efficiency_tokens)
        core = (self.flops.attention_core_per_position / 3 * T * seq / tp
                / (hw.peak_tflops * 1e12 * efficiency))
        imbalance = 1.0
        if is_moe:
            if not self.force_balance:
                imbalance = 1.0 + self.cal.routing_imbalance * (1.0 - 1.0 / spec.ep)
            experts_here = arch.num_experts // spec.ep
            per_expert = shape.expert_tokens / experts_here
            mlp = self._gemm(t, arch.num_experts, h)                                  # router
            # the busiest EP rank's experts receive `imbalance` times the mean tokens
            mlp += imbalance * self._mlp_forward(per_expert, arch.expert_ffn_hidden_size, spec.etp,
                                                 experts_here)
            if arch.moe_shared_expert_intermediate_size:
                mlp += self._mlp_forward(T, arch.moe_shared_expert_intermediate_size, tp)
        else:
            mlp = self._mlp_forward(T, arch.ffn_hidden_size, tp)
        forward = attention + core + mlp
        moved = ELEMENTWISE_PASSES * self.acts.layer(spec, is_moe, mbs, "none")
        if is_moe:  # permutation and un-permutation copy every token buffer, forward and backward
            moved += 2 * self.acts.dispatcher(spec, mbs)
        elementwise = moved / (hw.hbm_gbps * 1e9)
        compute = 3 * forward + elementwise
        if recompute == "full":
            compute += forward + elementwise / ELEMENTWISE_PASSES
        elif recompute == "selective":
            compute += core

        # Collectives per forward; backward repeats them, full recompute repeats the forward's.
        passes = 3 if recompute == "full" else 2
        blocks = 1 + (0 if is_moe else 1) + (1 if is_moe and arch.moe_shared_expert_intermediate_size else 0)
        hidden_bytes = T * h * a
        tp_time = 0.0
        if tp > 1:
            tp_time = passes * blocks * 2 * comm.all_gather_time(hidden_bytes, spans[("attention", "tp")], hw)
        cp_time = self._cp_time(spec, spans[("attention", "cp")], mbs, recompute, core)
        ep_time = 0.0
        if is_moe:
            moe_passes = 3 if recompute == "full" else 2
            tokens_out = t * arch.moe_router_topk * h * a
            ep_time = moe_passes * 2 * imbalance * comm.all_to_all_time(
                tokens_out, spans[("moe", "ep")], hw, self.cal.a2a_nvlink_efficiency,
                self.cal.a2a_network_efficiency)
            if spec.etp > 1:
                ep_time += moe_passes * 2 * imbalance * comm.all_gather_time(
                    shape.expert_tokens * h * a, spans[("moe", "etp")], hw)
        if is_moe and self.ep_overlap:
            ep_time = max(0.0, ep_time - compute)
        overhead = self.cal.layer_overhead_us + (self.cal.moe_overhead_us if is_moe else 0.0)
        if recompute == "full":  # the forward's launches once more (a third of the layer's)
            overhead *= 4 / 3
        return LayerTime(compute=compute, tp=tp_time, cp=cp_time, ep=ep_time,
                         overhead=overhead * 1e-6)

    def _cp_time(self, spec: FoldingSpec, span: comm.Span, mbs: int, recompute: str,
                 core: float) -> float:
        """Exposed seconds of context-parallel attention's exchanges in one layer, forward and
        backward, for one micro-batch; ``core`` is the rank's core-attention forward time.

        - p2p: CP-1 ring hops forward, each carrying one K/V block (the forward bytes / (CP-1))
          while the rank computes attention on one block (``core`` / CP). A hop shows only by
          what it takes beyond that block: exposed = sum over hops of max(0, hop - block), plus
          the first hop's latency, which nothing hides. Backward: CP-1 hops carrying K/V and a
          dK/dV accumulator (twice the bytes) under twice the block compute (backward is ~2x
          forward), the same first latency, and the last dK/dV hop home (the rest of the
          backward bytes), exposed whole: no compute is left to hide it.
        - all_gather: gather K/V forward; gather again and reduce-scatter dK/dV backward. Not
          overlapped.
        - a2a: four all-to-alls (q, k, v, output) each way; not overlapped.

        Recomputation of core attention (selective, or full with the whole layer) runs the
        forward's exchanges once more.
        """
        cp, mode = spec.cp, spec.cp_comm_type
        if cp == 1:
            return 0.0
        arch, hw = self.arch, self.hw
        if arch.multi_latent_attention:  # per-head K and V after the up-projections
            heads = groups = arch.num_attention_heads
            head_dim, value_dim = arch.qk_head_dim + arch.qk_pos_emb_head_dim, arch.v_head_dim
        else:
            heads, groups = arch.num_attention_heads, arch.query_groups
            head_dim, value_dim = arch.head_dim, None
        moved = exchange_bytes(mode, seq_length=self.training.seq_length, micro_batch_size=mbs,
                               num_attention_heads=heads, num_query_groups=groups,
                               head_dim=head_dim, value_head_dim=value_dim, tp=spec.tp, cp=cp,
                               element_bytes=self.a)
        if mode == "p2p":
            crosses = span.nodes > 1
            kv = moved.forward // (cp - 1)
            block = core / cp * self.cal.cp_overlap
            first = comm.latency(span, hw)
            hop = self.cal.cp_hop_overhead_us * 1e-6
            forward = first + (cp - 1) * (hop + max(0.0, comm.p2p_time(kv, crosses, hw) - block))
            backward = (first + (cp - 1) * (hop + max(0.0, comm.p2p_time(2 * kv, crosses, hw)
                                                       - 2 * block))
                        + comm.p2p_time(moved.backward - 2 * (cp - 1) * kv, crosses, hw))
        elif mode == "all_gather":
            # a ring all-gather of CP blocks sends CP-1 of them: the forward bytes
            gathered = moved.forward * cp / (cp - 1)
            forward = comm.all_gather_time(gathered, span, hw)
            backward = (comm.all_gather_time(gathered, span, hw)
                        + comm.reduce_scatter_time(gathered, span, hw))
        else:
            # each rank keeps 1/CP of the q, k, v and output buffers and sends the rest
            buffers = moved.forward * cp / (cp - 1)
            forward = comm.all_to_all_time(buffers, span, hw) + 3 * (cp - 1) * comm.latency(span, hw)
            backward = forward
        forward_passes = 2 if recompute in ("full", "selective") else 1
        return forward_passes * forward + backward

    def _head_time(self, spec: FoldingSpec, mbs: int, pre: bool, post: bool) -> float:
        """Embedding lookup (memory-bound, small) and output layers of the end stages."""
        if not post:
            return 0.0
        shape = self.acts.shape(spec, mbs)
        vocab = padded_vocab_size(self.arch, spec.tp) / spec.tp
        heads = 1 + (self.arch.mtp_num_layers or 0)
        logits = 3 * self._gemm(shape.tokens, vocab, self.arch.hidden_size)
        # softmax and cross entropy over fp32 logits, forward and backward
        loss = 4 * shape.tokens * vocab * 4 / (self.hw.hbm_gbps * 1e9)
        return heads * (logits + loss)

    # ------------------------------------------------------------------------- one step
    def model_flops(self, tp: int) -> int:
        if tp not in self._model_flops:
            self._model_flops[tp] = training_flops(self.arch, self.training.seq_length,
                                                   self.training.global_batch_size, tp)
        return self._model_flops[tp]

    def stage_layer_time(self, spec: FoldingSpec, spans: Dict, pp_rank: int, mbs: int,
                         recompute: str) -> Tuple[LayerTime, float]:
        """All chunks of one pipeline rank for one micro-batch: layers and end-stage heads."""
        total = LayerTime(0.0, 0.0, 0.0, 0.0, 0.0)
        moe, dense = self.params.rank_layer_kinds(spec.pp, spec.vpp, pp_rank)
        if moe:
            total = total + self.layer_time(spec, spans, True, mbs, recompute).scaled(moe)
        if dense:
            total = total + self.layer_time(spec, spans, False, mbs, recompute).scaled(dense)
        last = pp_rank == spec.pp - 1
        if last and self.arch.mtp_num_layers:
            total = total + self.layer_time(spec, spans, bool(self.params.pattern[-1]), mbs,
                                            recompute).scaled(self.arch.mtp_num_layers)
        return total, self._head_time(spec, mbs, pp_rank == 0, last)

    def step_time(self, spec: FoldingSpec, mbs: int, recompute: str,
                  spans: Optional[Dict] = None) -> StepTime:
        hw, training = self.hw, self.training
        spans = spans or comm.group_spans(spec)
        m = num_microbatches(training, spec, mbs)
        vpp = spec.vpp or 1
        # The pipeline advances at the pace of its slowest stage.
        stage_ranks = {0, spec.pp - 1} | ({1} if spec.pp > 2 else set())
        per_stage = {r: self.stage_layer_time(spec, spans, r, mbs, recompute) for r in stage_ranks}
        slowest = max(per_stage, key=lambda r: per_stage[r][0].total + per_stage[r][1])
        layers, heads = per_stage[slowest]
        stage_mb = layers.total + heads
        pipeline = (m + (spec.pp - 1) / vpp) * stage_mb
        bubble = (spec.pp - 1) / vpp * stage_mb

        p2p = 0.0
        if spec.pp > 1:
            shape = self.acts.shape(spec, mbs)
            crosses = spans[("attention", "pp")].nodes > 1
            slots = m * vpp + spec.pp - 1
            if spec.vpp:  # the interleaved schedule overlaps its sends with compute
                one = (hw.network_latency_us if crosses else hw.nvlink_latency_us) * 1e-6
            else:
                one = comm.p2p_time(shape.sp_tokens * self.arch.hidden_size * self.a, crosses, hw)
            p2p = 2 * slots * one

        counts = max((self.params.rank_counts(spec, r) for r in stage_ranks), key=lambda c: c.total)
        dense_dp, expert_dp = sharding_degrees(spec)
        dense_span = spans[("attention", "dp_cp")]
        expert_span = spans[("moe", "edp")] if spec.ep > 1 else dense_span
        b = state_bytes(training.precision)
        dense_elems, expert_elems = counts.dense + counts.embedding, counts.expert
        if training.use_distributed_optimizer:
            reduce = (comm.reduce_scatter_time(dense_elems * b.grad, dense_span, hw)
                      + comm.reduce_scatter_time(expert_elems * b.grad, expert_span, hw))
            gather = (comm.all_gather_time(dense_elems * b.param, dense_span, hw)
                      + comm.all_gather_time(expert_elems * b.param, expert_span, hw))
            shard = dense_elems / dense_dp + expert_elems / expert_dp
        else:
            reduce = (comm.all_reduce_time(dense_elems * b.grad, dense_span, hw)
                      + comm.all_reduce_time(expert_elems * b.grad, expert_span, hw))
            gather, shard = 0.0, dense_elems + expert_elems
        if training.overlap_grad_reduce:
            reduce = max(0.0, reduce - 2 / 3 * stage_mb)
        if training.overlap_param_gather:
            gather = max(0.0, gather - 1 / 3 * stage_mb)
        dp = reduce + gather
        optimizer = shard * OPTIMIZER_BYTES_PER_ELEMENT / (hw.hbm_gbps * 1e9)
        total = pipeline + p2p + dp + optimizer
        return StepTime(total=total, pipeline=pipeline, bubble=bubble, p2p=p2p, dp=dp,
                        optimizer=optimizer, layers=layers, model_flops=self.model_flops(spec.tp),
                        world_size=spec.world_size, peak_tflops=hw.peak_tflops, heads=heads)
