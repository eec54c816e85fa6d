"""One folding's predicted step time, throughput and memory: what ``folding predict`` prints and
what the calibration fits. Pure computation; the same ``StepTimeModel`` as the planner."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional

from folding.cost.calibration import FITTED, Calibration
from folding.cost.flops import training_flops
from folding.cost.hardware import HardwareProfile
from folding.cost.memory import ActivationModel, ActivationOptions, RankMemory, peak_memory
from folding.cost.step_time import StepTime, StepTimeModel
from folding.errors import FoldingError
from folding.layout.parameters import ParameterModel
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

PRECISIONS = ("bf16", "fp8")


@dataclass(frozen=True)
class Prediction:
    spec: FoldingSpec
    micro_batch_size: int
    recompute: str
    time: StepTime
    memory: Optional[RankMemory]

    @property
    def memory_gb(self) -> Optional[float]:
        return None if self.memory is None else self.memory.total / 1e9

    def breakdown(self) -> Dict[str, float]:
        """Seconds of one iteration by cause; they add up to the step time.

        Per-layer costs are charged for every micro-batch slot of the slowest stage (its
        micro-batches plus the bubble's share) and split in proportion."""
        t = self.time
        layers = t.layers
        stage = layers.total + t.heads
        parts = {"compute": layers.compute, "tp": layers.tp, "cp": layers.cp, "ep": layers.ep,
                 "overhead": layers.overhead, "output_layer": t.heads}
        busy = t.pipeline - t.bubble
        out = {k: (busy * v / stage if stage else 0.0) for k, v in parts.items()}
        out.update({"pp_bubble": t.bubble, "pp_p2p": t.p2p, "dp": t.dp, "optimizer": t.optimizer})
        return out


def pipeline_arch(arch: ModelArch, pipeline_layers: Optional[int]) -> ModelArch:
    """``arch`` with ``pipeline_layers`` decoder layers (MoE pattern extended with its last
    kind, the MTP layer counted among them): a stand-in for an uneven pipeline layout whose
    busiest stage holds pipeline_layers / PP layers."""
    if not pipeline_layers or pipeline_layers == arch.num_layers:
        return arch
    freq = arch.moe_layer_freq
    if isinstance(freq, (list, tuple)):
        freq = list(freq) + [freq[-1]] * (pipeline_layers - len(freq))
    return dataclasses.replace(arch, num_layers=pipeline_layers, moe_layer_freq=freq,
                               mtp_num_layers=None)


class Predictor:
    """Predictions for one model, training setup and GPU; the parameter and activation models
    are built once and reused across foldings and calibrations."""

    def __init__(self, arch: ModelArch, training: TrainingSetup, hw: HardwareProfile,
                 options: ActivationOptions = ActivationOptions(),
                 pipeline_layers: Optional[int] = None, ep_overlap: bool = False,
                 force_balance: bool = False):
        if training.precision not in PRECISIONS:
            raise FoldingError(f"unknown precision {training.precision!r}; use "
                               f"{' or '.join(PRECISIONS)}")
        if training.precision == "fp8" and not hw.peak_fp8_tflops:
            raise FoldingError(f"{hw.name} has no FP8 tensor cores: use --precision bf16")
        self.arch, self.training, self.hw, self.options = arch, training, hw, options
        self.ep_overlap, self.force_balance = ep_overlap, force_balance
        self.timed_arch = pipeline_arch(arch, pipeline_layers)
        self.params = ParameterModel(self.timed_arch, training.seq_length)
        self.acts = ActivationModel(self.timed_arch, training, options)
        self._flops: Dict[int, int] = {}

    def spec(self, gpus: int, gpus_per_node: int, tp: int = 1, cp: int = 1, pp: int = 1,
             vpp: Optional[int] = None, ep: int = 1, etp: Optional[int] = None,
             cp_comm_type: str = "p2p") -> FoldingSpec:
        """The folding, checked against the model (raises InvalidFolding, a FoldingError)."""
        a = self.timed_arch
        return FoldingSpec(world_size=gpus, tp=tp, cp=cp, pp=pp, vpp=vpp, ep=ep, etp=etp,
                           gpus_per_node=gpus_per_node, num_experts=a.num_experts,
                           num_layers=a.num_layers, num_attention_heads=a.num_attention_heads,
                           num_query_groups=a.query_groups, cp_comm_type=cp_comm_type)

    def step_time(self, spec: FoldingSpec, mbs: int, recompute: str,
                  calibration: Optional[Calibration] = FITTED) -> StepTime:
        hw = dataclasses.replace(self.hw, gpus_per_node=spec.gpus_per_node)
        if self.training.global_batch_size % (mbs * spec.dp):
            raise FoldingError(f"global batch {self.training.global_batch_size} is not a "
                               f"multiple of micro-batch {mbs} x DP {spec.dp}")
        if spec.vpp and (self.training.global_batch_size // (mbs * spec.dp)) % spec.pp:
            raise FoldingError(f"the interleaved schedule needs the micro-batches per step "
                               f"({self.training.global_batch_size // (mbs * spec.dp)}) to be a "
                               f"multiple of PP {spec.pp}")
        timer = StepTimeModel(self.timed_arch, self.training, hw, self.params, self.acts,
                              calibration, self.ep_overlap, self.force_balance)
        step = timer.step_time(spec, mbs, recompute)
        if self.timed_arch is not self.arch:
            if spec.tp not in self._flops:
                self._flops[spec.tp] = training_flops(self.arch, self.training.seq_length,
                                                      self.training.global_batch_size, spec.tp)
            step = dataclasses.replace(step, model_flops=self._flops[spec.tp])
        return step

    def predict(self, spec: FoldingSpec, mbs: int, recompute: str,
                calibration: Optional[Calibration] = FITTED, memory: bool = True) -> Prediction:
        step = self.step_time(spec, mbs, recompute, calibration)
        mem = None
        if memory:
            mem = peak_memory(self.timed_arch, self.training, spec, self.options, mbs, recompute,
                              self.params, activation_model=self.acts)
        return Prediction(spec, mbs, recompute, step, mem)
