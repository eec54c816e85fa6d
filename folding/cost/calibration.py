"""The step-time model's global parameters: what a GPU cluster reaches of its datasheet rates.

``StepTimeModel`` costs GEMMs, attention and collectives from a ``HardwareProfile``'s peaks; a
``Calibration`` says which fraction of them a real Megatron-Core job reaches, and what it pays
besides (routing imbalance, kernel launches and host synchronisation). The parameters are
global: one set, fitted once (``folding.cost.fit``, run by ``tools/calibrate.py``) on the
published measurements of ``folding.cost.published`` and shared by every model and folding.
There is no per-model or per-row constant.

``Calibration.from_profile(hw)`` is the uncalibrated roofline: the profile's own assumptions,
no imbalance and no overhead. ``FITTED`` is the stored fit, which ``folding plan`` and
``folding predict`` use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Dict, Tuple

from folding.cost.hardware import HardwareProfile


@dataclass(frozen=True)
class Calibration:
    """Global parameters of the step-time model (see docs/calibration.md)."""

    gemm_efficiency: float
    """Fraction of the dense peak a large GEMM reaches."""
    gemm_half_dim: float
    """A GEMM whose smallest dimension is d reaches gemm_efficiency x d / (d + gemm_half_dim):
    thin GEMMs (fine-grained experts, few tokens per expert, wide tensor parallelism) are
    slower per FLOP."""
    attention_efficiency: float
    """Fraction of the dense BF16 peak fused causal attention reaches on long key blocks
    (shorter blocks: the profile's attention_half_efficiency_tokens curve)."""
    fp8_cast_bytes: float
    """FP8 training casts each GEMM's operands to FP8 in separate memory-bound kernels: this many
    bytes of HBM traffic per operand element (read BF16, write FP8, transposed copies for the
    backward GEMMs). It costs most where GEMMs are thin (small hidden or expert widths). Bounded
    by 6: read 2, write 1, a transposed FP8 copy 1, and one more BF16 read for the amax."""
    a2a_nvlink_efficiency: float
    """Token all-to-all bandwidth inside a node, as a fraction of the NVLink rate."""
    a2a_network_efficiency: float
    """Token all-to-all bandwidth across nodes, as a fraction of the adapter rate."""
    routing_imbalance: float
    """Real routing loads the busiest of EP ranks with 1 + this x (1 - 1/EP) times the mean
    number of tokens: its expert GEMMs and all-to-all take that much longer. Runs that force
    balanced routing (``StepTimeModel(force_balance=True)``) pay none."""
    layer_overhead_us: float
    """Microseconds per layer and micro-batch (forward and backward) that no rate explains:
    kernel launches, small kernels, stream waits."""
    moe_overhead_us: float
    """Further microseconds per MoE layer and micro-batch: dropless dispatch's host
    synchronisation on token counts, permutation and router kernels."""
    fp8_gemm_efficiency: float = 1.0
    """Assumption (not fitted): an FP8 GEMM reaches the same fraction of the FP8 peak as a
    BF16 GEMM of the BF16 peak (the casts are charged apart, fp8_cast_bytes)."""
    cp_overlap: float = 0.8
    """Assumption (no published row uses CP, so it is not fitted): a p2p ring hop hides behind
    this fraction of its attention block's compute."""
    cp_hop_overhead_us: float = 30.0
    """Assumption (not fitted, as cp_overlap): microseconds per ring hop that nothing hides
    (one more attention kernel launch and the softmax-statistics correction of its output)."""

    @classmethod
    def from_profile(cls, hw: HardwareProfile) -> "Calibration":
        """The uncalibrated roofline: the profile's stated efficiencies, nothing else."""
        return cls(gemm_efficiency=hw.gemm_efficiency, gemm_half_dim=0.0,
                   attention_efficiency=hw.attention_efficiency, fp8_cast_bytes=0.0,
                   fp8_gemm_efficiency=1.0,
                   a2a_nvlink_efficiency=hw.nvlink_efficiency,
                   a2a_network_efficiency=hw.network_efficiency, routing_imbalance=0.0,
                   layer_overhead_us=0.0, moe_overhead_us=0.0, cp_overlap=1.0,
                   cp_hop_overhead_us=0.0)

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


# The parameters fitted, their bounds, and the fixed priors. The fit works on these names only.
FITTED_NAMES: Tuple[str, ...] = ("gemm_efficiency", "gemm_half_dim", "attention_efficiency",
                                 "fp8_cast_bytes", "a2a_nvlink_efficiency",
                                 "a2a_network_efficiency", "routing_imbalance",
                                 "layer_overhead_us", "moe_overhead_us")
BOUNDS: Dict[str, Tuple[float, float]] = {
    "gemm_efficiency": (0.4, 0.95),
    "gemm_half_dim": (0.0, 2048.0),
    "attention_efficiency": (0.3, 0.9),
    "fp8_cast_bytes": (0.0, 6.0),
    "a2a_nvlink_efficiency": (0.05, 1.0),
    "a2a_network_efficiency": (0.05, 1.0),
    "routing_imbalance": (0.0, 1.5),
    "layer_overhead_us": (0.0, 3000.0),
    "moe_overhead_us": (0.0, 10000.0),
}
assert set(BOUNDS) == set(FITTED_NAMES) and set(FITTED_NAMES) <= {f.name for f in fields(Calibration)}

# --- fitted: written by `python tools/calibrate.py --write`; do not edit by hand ---
FITTED = Calibration(
    gemm_efficiency=0.6698845922576333,
    gemm_half_dim=117.49206078308691,
    attention_efficiency=0.3,
    fp8_cast_bytes=5.999999999999999,
    a2a_nvlink_efficiency=0.2685160195280978,
    a2a_network_efficiency=0.8480345490398753,
    routing_imbalance=5.083311461541089e-16,
    layer_overhead_us=2.31442153018488e-16,
    moe_overhead_us=1.0698606701214249e-15,
)
# --- end fitted ---
