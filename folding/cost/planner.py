"""The folding planner: every legal folding of a model on N GPUs, those that fit, ranked by
predicted step time.

``enumerate_foldings`` is the one enumeration of foldings. It walks the degrees cheaply (the
integer rules of ``FoldingSpec``: world-size products, divisibility of heads, query groups,
experts and layers, sequence parallelism with TP > 1) and builds a ``FoldingSpec`` once per
(TP, CP, PP, ETP, EP), which checks every rule, the rank-order ones included. Interleaving adds
one rule only (layers divisible by PP x VPP, VPP with PP > 1), so VPP variants reuse the
validated spec (``_with_vpp``); tests check that every folding it yields equals a freshly
built ``FoldingSpec``, and that it yields every legal folding of a grid.

The search space is limited to what a training job would use: TP and ETP inside a node, CP up
to ``max_cp`` with the sequence divisible by 2 x CP (Megatron's load-balanced causal split) and by
TP after it, ETP = TP when EP = 1 (see ``expert_gradients_over_edp``), micro-batch sizes that
divide the global batch, micro-batch counts divisible by PP with the interleaved schedule
(Megatron's schedule requires it), and recompute none, selective or full.

Rows are (folding, micro-batch size, recompute) combinations; ``Plan.foldings_ranked`` keeps
the fastest row of each folding, which is what the ranked table shows.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from folding.cost import comm
from folding.cost.calibration import FITTED, Calibration
from folding.cost.hardware import HardwareProfile
from folding.cost.memory import ActivationModel, ActivationOptions, RankMemory, peak_memory
from folding.cost.step_time import StepTime, StepTimeModel
from folding.errors import FoldingError, InvalidFolding
from folding.layout.parameters import ParameterModel
from folding.mesh import DEFAULT_ORDER, FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

RECOMPUTE_OPTIONS = ("none", "selective", "full")


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _with_vpp(spec: FoldingSpec, vpp: Optional[int]) -> FoldingSpec:
    """``spec`` with a different VPP. The caller has checked the only rule VPP adds (layers
    divisible by PP x VPP, VPP > 1 only with PP > 1); nothing else FoldingSpec derives or
    checks depends on VPP, so the validated spec is copied instead of rebuilt."""
    out = copy.copy(spec)
    object.__setattr__(out, "vpp", vpp if vpp and vpp > 1 else None)
    return out


def enumerate_foldings(arch: ModelArch, gpus: int, gpus_per_node: int, seq_length: int,
                       max_tp: Optional[int] = None, max_cp: int = 8,
                       order: str = DEFAULT_ORDER,
                       cp_comm_types: Sequence[str] = ("p2p",)) -> Iterator[FoldingSpec]:
    """Every legal folding of ``arch`` on ``gpus`` GPUs within the planner's search space; with
    CP > 1, one per context-parallel comm type in ``cp_comm_types`` that the model allows."""
    max_tp = max_tp or gpus_per_node
    heads, groups, layers = arch.num_attention_heads, arch.query_groups, arch.num_layers
    experts = arch.num_experts
    tps = [d for d in divisors(gpus) if d <= max_tp and heads % d == 0 and groups % d == 0]
    cps = [d for d in divisors(gpus) if d <= max_cp and seq_length % (2 * d if d > 1 else 1) == 0]
    pps = [d for d in divisors(gpus) if layers % d == 0]
    etps = [d for d in divisors(gpus) if d <= max_tp]
    eps = [d for d in divisors(gpus) if d <= experts and experts % d == 0] if experts else [1]
    for pp in pps:
        vpps = [None] + [v for v in divisors(layers // pp) if v > 1] if pp > 1 else [None]
        for tp in tps:
            for cp in cps:
                if gpus % (tp * cp * pp) or (seq_length // cp) % tp:
                    continue
                for etp in (etps if experts else [tp]):
                    for ep in eps:
                        # megatron-core 0.16 reduces expert gradients over EDP only when EP > 1:
                        # with EP = 1 an expert TP different from TP would sync them wrongly.
                        if gpus % (etp * ep * pp) or (ep == 1 and etp != tp):
                            continue
                        for mode in (cp_comm_types if cp > 1 else ("p2p",)):
                            try:
                                base = FoldingSpec(world_size=gpus, tp=tp, cp=cp, pp=pp, etp=etp,
                                                   ep=ep, order=order, gpus_per_node=gpus_per_node,
                                                   num_experts=experts, num_layers=layers,
                                                   num_attention_heads=heads,
                                                   num_query_groups=groups, cp_comm_type=mode)
                            except InvalidFolding:
                                continue
                            for vpp in vpps:
                                yield _with_vpp(base, vpp)


@dataclass(frozen=True)
class PlanRow:
    """One folding with a micro-batch size and a recompute choice, costed."""

    spec: FoldingSpec
    micro_batch_size: int
    recompute: str
    time: StepTime
    memory: RankMemory

    @property
    def memory_gb(self) -> float:
        return self.memory.total / 1e9

    def to_json(self) -> Dict:
        return {"folding": self.spec.degrees(),
                "describe": self.spec.describe(), "micro_batch_size": self.micro_batch_size,
                "recompute": self.recompute, "step_time_s": self.time.total,
                "tflops_per_gpu": self.time.tflops_per_gpu, "mfu": self.time.mfu,
                "memory_gb": self.memory_gb,
                "memory": {"params_gb": self.memory.weights.params / 1e9,
                           "grads_gb": self.memory.weights.grads / 1e9,
                           "optimizer_gb": self.memory.weights.optimizer / 1e9,
                           "activations_gb": self.memory.activations / 1e9,
                           "transient_gb": self.memory.transient / 1e9,
                           "pp_rank": self.memory.pp_rank},
                "time": self.time.breakdown()}


@dataclass
class Plan:
    """Ranked rows and what was searched."""

    rows: List[PlanRow]
    """Rows that fit, fastest first."""
    foldings: int
    """Legal foldings enumerated."""
    evaluated: int
    """(folding, micro-batch size, recompute) combinations costed."""
    rejected_memory: int
    """Combinations that did not fit in memory."""

    def foldings_ranked(self) -> List[PlanRow]:
        """The fastest row of each distinct folding, fastest first."""
        seen, out = set(), []
        for row in self.rows:
            key = folding_key(row.spec)
            if key not in seen:
                seen.add(key)
                out.append(row)
        return out

    def rank_of(self, match: Callable[[PlanRow], bool]) -> Optional[int]:
        """1-based rank, among distinct foldings, of the first one ``match`` accepts."""
        return next((i + 1 for i, row in enumerate(self.foldings_ranked()) if match(row)), None)


def folding_key(spec: FoldingSpec) -> tuple:
    return (spec.tp, spec.cp, spec.dp, spec.pp, spec.vpp, spec.etp, spec.ep, spec.edp)


def same_degrees(spec: FoldingSpec, **degrees) -> bool:
    return all(getattr(spec, k) == (v if not (k == "vpp" and v == 1) else None)
               for k, v in degrees.items())


def plan(arch: ModelArch, training: TrainingSetup, hw: HardwareProfile, gpus: int,
         gpus_per_node: int, gpu_memory_gb: float, micro_batch_sizes: Sequence[int] = (1, 2, 4),
         recompute: Sequence[str] = RECOMPUTE_OPTIONS, max_cp: int = 8,
         options: ActivationOptions = ActivationOptions(), progress=None,
         cp_comm_types: Sequence[str] = ("p2p",),
         calibration: Optional[Calibration] = FITTED) -> Plan:
    """Cost every legal folding; keep those whose peak rank fits in ``gpu_memory_gb``.

    Step times come from ``StepTimeModel`` with ``calibration`` (the stored fit by default, the
    same model ``folding predict`` uses; None: the profile's uncalibrated roofline)."""
    if gpus < 1 or gpus_per_node < 1:
        raise FoldingError("--gpus and --gpus-per-node must be positive")
    hw = replace(hw, gpus_per_node=gpus_per_node)
    budget = gpu_memory_gb * 1e9 - hw.reserved_gb * 1e9
    params = ParameterModel(arch, training.seq_length)
    acts = ActivationModel(arch, training, options)
    timer = StepTimeModel(arch, training, hw, params, acts, calibration)
    foldings = list(enumerate_foldings(arch, gpus, gpus_per_node, training.seq_length, max_cp=max_cp,
                                       cp_comm_types=cp_comm_types))
    rows: List[PlanRow] = []
    evaluated = rejected = 0
    spans_cache: Dict[tuple, Dict] = {}
    for spec in (progress(foldings) if progress else foldings):
        key = (spec.tp, spec.cp, spec.pp, spec.etp, spec.ep)
        if key not in spans_cache:
            spans_cache[key] = comm.group_spans(spec)
        spans = spans_cache[key]
        # The stages that can hold the most: the first (most micro-batches in flight), the second
        # (the first full of MoE layers when the first layers are dense), the last (output layer).
        stages = sorted({0, min(1, spec.pp - 1), spec.pp - 1})
        for mbs in micro_batch_sizes:
            if training.global_batch_size % (mbs * spec.dp):
                continue
            if spec.vpp and (training.global_batch_size // (mbs * spec.dp)) % spec.pp:
                continue
            for choice in recompute:
                evaluated += 1
                memory = peak_memory(arch, training, spec, options, mbs, choice, params,
                                     activation_model=acts, stages=stages)
                if memory.total > budget:
                    rejected += 1
                    continue
                rows.append(PlanRow(spec, mbs, choice, timer.step_time(spec, mbs, choice, spans),
                                    memory))
    rows.sort(key=lambda r: r.time.total)
    return Plan(rows=rows, foldings=len(foldings), evaluated=evaluated, rejected_memory=rejected)
