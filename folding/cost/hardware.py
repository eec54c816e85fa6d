"""GPU profiles for the planner: peak rates and bandwidths, each with its public source.

Datasheet figures are peaks. What a training job reaches is less, so each profile also carries
achievable fractions (GEMM and attention efficiency, collective bus-bandwidth efficiency) and
latencies. Those are assumptions, labelled as such below; the planner ranks foldings with them
and they can be changed per run (``HardwareProfile`` is a frozen dataclass: use
``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

from folding.errors import FoldingError


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU model in an NVLink domain of ``gpus_per_node`` GPUs with one network adapter per
    GPU. Every datasheet figure is per GPU."""

    name: str
    """Profile name, e.g. h100-sxm."""
    peak_tflops: float
    """Dense BF16 tensor-core peak in TFLOP/s (no sparsity): the MFU denominator."""
    memory_gb: float
    """HBM capacity in GB (10^9 bytes)."""
    hbm_gbps: float
    """HBM bandwidth in GB/s."""
    nvlink_gbps: float
    """NVLink bandwidth per GPU per direction in GB/s (half the bidirectional datasheet figure)."""
    network_gbps: float
    """Inter-node bandwidth per GPU per direction in GB/s (one adapter per GPU)."""
    peak_fp8_tflops: Optional[float]
    """Dense FP8 tensor-core peak in TFLOP/s (no sparsity); None where the GPU has no FP8."""
    gpus_per_node: int = 8
    """GPUs sharing one NVLink domain."""
    gemm_efficiency: float = 0.75
    """Assumption: fraction of peak a large BF16 GEMM reaches (cuBLAS on H100 SXM reaches about
    700-800 TFLOP/s on large square GEMMs in public benchmarks)."""
    attention_efficiency: float = 0.5
    """Assumption: fraction of peak fused causal attention reaches, forward and backward
    together (FlashAttention-2/cuDNN class kernels on Hopper)."""
    attention_half_efficiency_tokens: int = 300
    """Assumption: fused attention reaches attention_efficiency x L / (L + this) on key blocks of
    L tokens (the shape of FlashAttention-2's published causal forward+backward throughput
    against sequence length, head dim 128: about 61% of its long-sequence rate at 512 tokens, 78%
    at 1K, 94% at 4K). Context parallelism shortens the blocks to seq / (2 CP)."""
    nvlink_efficiency: float = 0.8
    """Assumption: NCCL bus bandwidth over NVLink as a fraction of the link rate (nccl-tests on
    8-GPU H100 nodes report about 360 GB/s of 450 GB/s without NVLink SHARP)."""
    network_efficiency: float = 0.9
    """Assumption: NCCL bus bandwidth over InfiniBand NDR as a fraction of the adapter rate."""
    nvlink_latency_us: float = 5.0
    """Assumption: per-step latency of an NCCL collective inside a node."""
    network_latency_us: float = 10.0
    """Assumption: per-step latency of an NCCL collective across nodes."""
    reserved_gb: float = 4.0
    """Assumption: memory the training state cannot use (CUDA context, NCCL buffers, cuBLAS
    workspaces, allocator fragmentation)."""
    sources: Dict[str, str] = field(default_factory=dict, compare=False)
    """Where each datasheet figure comes from."""


H100_SXM = HardwareProfile(
    name="h100-sxm",
    peak_tflops=989.4,
    memory_gb=80.0,
    hbm_gbps=3350.0,
    nvlink_gbps=450.0,
    network_gbps=50.0,
    peak_fp8_tflops=1978.9,
    sources={
        "peak_tflops": "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), H100 SXM5 "
                       "peak BF16 tensor TFLOPS with FP32 accumulate: 989.4 dense (1,978.9 with "
                       "sparsity); the H100 datasheet lists 1,979 TFLOPS with sparsity",
        "peak_fp8_tflops": "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), H100 SXM5 "
                           "peak FP8 tensor TFLOPS with FP32 accumulate: 1,978.9 dense (3,957.8 "
                           "with sparsity); the H100 datasheet lists 3,958 TFLOPS with sparsity",
        "memory_gb": "NVIDIA H100 datasheet, H100 SXM: 80 GB HBM3",
        "hbm_gbps": "NVIDIA H100 datasheet, H100 SXM: 3.35 TB/s",
        "nvlink_gbps": "NVIDIA H100 datasheet, H100 SXM: NVLink 900 GB/s (bidirectional), "
                       "450 GB/s per direction",
        "network_gbps": "NVIDIA DGX H100 datasheet: 8x single-port ConnectX-7, 400 Gb/s "
                        "InfiniBand per GPU = 50 GB/s per direction",
    },
)

H200_SXM = HardwareProfile(
    name="h200-sxm",
    peak_tflops=989.4,
    memory_gb=141.0,
    hbm_gbps=4800.0,
    nvlink_gbps=450.0,
    network_gbps=50.0,
    peak_fp8_tflops=1978.9,
    sources={
        "peak_tflops": "NVIDIA H200 datasheet, H200 SXM: BF16 tensor core 1,979 TFLOPS with "
                       "sparsity, i.e. 989.4 dense (the same GH100 tensor cores as H100 SXM)",
        "peak_fp8_tflops": "NVIDIA H200 datasheet, H200 SXM: FP8 tensor core 3,958 TFLOPS with "
                           "sparsity, i.e. 1,978.9 dense (as H100 SXM)",
        "memory_gb": "NVIDIA H200 datasheet, H200 SXM: 141 GB HBM3e",
        "hbm_gbps": "NVIDIA H200 datasheet, H200 SXM: 4.8 TB/s",
        "nvlink_gbps": "NVIDIA H200 datasheet, H200 SXM: NVLink 900 GB/s (bidirectional), "
                       "450 GB/s per direction",
        "network_gbps": "NVIDIA DGX H200 datasheet: 8x single-port ConnectX-7, 400 Gb/s "
                        "InfiniBand per GPU = 50 GB/s per direction",
    },
)

# The A100 and Blackwell profiles keep the default efficiency and latency assumptions above,
# which were chosen from Hopper measurements: they are labelled guesses there.
A100_SXM_80GB = HardwareProfile(
    name="a100-sxm-80gb",
    peak_tflops=312.0,
    memory_gb=80.0,
    hbm_gbps=2039.0,
    nvlink_gbps=300.0,
    network_gbps=25.0,
    peak_fp8_tflops=None,
    sources={
        "peak_tflops": "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: BF16 tensor core "
                       "312 TFLOPS (624 with sparsity)",
        "peak_fp8_tflops": "NVIDIA A100 datasheet and Ampere architecture whitepaper: A100 "
                           "tensor cores have no FP8 (FP8 arrived with Hopper)",
        "memory_gb": "NVIDIA A100 datasheet, A100 80GB SXM: 80 GB HBM2e",
        "hbm_gbps": "NVIDIA A100 datasheet, A100 80GB SXM: 2,039 GB/s",
        "nvlink_gbps": "NVIDIA A100 datasheet, A100 SXM: NVLink 600 GB/s (bidirectional), "
                       "300 GB/s per direction",
        "network_gbps": "NVIDIA DGX A100 datasheet: 8x single-port ConnectX-6, 200 Gb/s HDR "
                        "InfiniBand per GPU = 25 GB/s per direction",
    },
)

B200 = HardwareProfile(
    name="b200",
    peak_tflops=2250.0,
    memory_gb=180.0,
    hbm_gbps=8000.0,
    nvlink_gbps=900.0,
    network_gbps=50.0,
    peak_fp8_tflops=4500.0,
    sources={
        "peak_tflops": "NVIDIA HGX B200 specifications: FP16/BF16 tensor core 36 PFLOPS with "
                       "sparsity for 8 GPUs = 4,500 per GPU with sparsity, 2,250 dense",
        "peak_fp8_tflops": "NVIDIA HGX B200 specifications: FP8 tensor core 72 PFLOPS with "
                           "sparsity for 8 GPUs = 9,000 per GPU with sparsity, 4,500 dense",
        "memory_gb": "NVIDIA DGX B200 datasheet: 1,440 GB HBM3e for 8 GPUs = 180 GB per GPU",
        "hbm_gbps": "NVIDIA DGX B200 datasheet / HGX B200 specifications: 64 TB/s HBM3e for 8 "
                    "GPUs = 8 TB/s per GPU",
        "nvlink_gbps": "NVIDIA HGX B200 specifications: fifth-generation NVLink 1.8 TB/s per GPU "
                       "(bidirectional; 14.4 TB/s for 8 GPUs), 900 GB/s per direction",
        "network_gbps": "NVIDIA DGX B200 datasheet: 8x single-port ConnectX-7 VPI, 400 Gb/s "
                        "InfiniBand per GPU = 50 GB/s per direction",
    },
)

GB200 = HardwareProfile(
    name="gb200-nvl72",
    peak_tflops=2500.0,
    memory_gb=186.0,
    hbm_gbps=8000.0,
    nvlink_gbps=900.0,
    network_gbps=50.0,
    peak_fp8_tflops=5000.0,
    gpus_per_node=72,
    sources={
        "peak_tflops": "NVIDIA GB200 NVL72 specifications: FP16/BF16 tensor core 360 PFLOPS with "
                       "sparsity for 72 GPUs (10 PFLOPS per GB200 superchip of 2 GPUs) = 5,000 "
                       "per GPU with sparsity, 2,500 dense",
        "peak_fp8_tflops": "NVIDIA GB200 NVL72 specifications: FP8 tensor core 720 PFLOPS with "
                           "sparsity for 72 GPUs (20 PFLOPS per superchip) = 10,000 per GPU with "
                           "sparsity, 5,000 dense",
        "memory_gb": "NVIDIA GB200 NVL72 specifications: up to 13.4 TB HBM3e for 72 GPUs (up to "
                     "372 GB per superchip) = 186 GB per GPU",
        "hbm_gbps": "NVIDIA GB200 NVL72 specifications: 576 TB/s HBM3e for 72 GPUs (16 TB/s per "
                    "superchip) = 8 TB/s per GPU",
        "nvlink_gbps": "NVIDIA GB200 NVL72 specifications: fifth-generation NVLink 130 TB/s for "
                       "72 GPUs = 1.8 TB/s per GPU (bidirectional), 900 GB/s per direction; all "
                       "72 GPUs of a rack share the NVLink domain (gpus_per_node=72)",
        "network_gbps": "NVIDIA GB200 NVL72 reference architecture: one ConnectX-7 400 Gb/s "
                        "InfiniBand adapter per GPU (4 per compute tray of 4 GPUs) = 50 GB/s per "
                        "direction",
    },
)

PROFILES: Dict[str, HardwareProfile] = {p.name: p for p in (A100_SXM_80GB, H100_SXM, H200_SXM,
                                                             B200, GB200)}


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise FoldingError(f"unknown GPU {name!r}; known: {', '.join(PROFILES)}") from None
