"""GPU profiles for the planner: peak rates and bandwidths, each with its public source.

Datasheet figures are peaks. What a training job reaches is less, so each profile also carries
achievable fractions (GEMM and attention efficiency, collective bus-bandwidth efficiency) and
latencies. Those are assumptions, labelled as such below; the planner ranks foldings with them
and they can be changed per run (``HardwareProfile`` is a frozen dataclass: use
``dataclasses.replace``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

from folding.errors import FoldingError


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU model in an 8-GPU NVLink node with one network adapter per GPU."""

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
    """Inter-node bandwidth per GPU per direction in GB/s (one 400 Gb/s adapter per GPU)."""
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
    sources={
        "peak_tflops": "NVIDIA H100 Tensor Core GPU Architecture whitepaper (2022), H100 SXM5 "
                       "peak BF16 tensor TFLOPS with FP32 accumulate: 989.4 dense (1,978.9 with "
                       "sparsity); the H100 datasheet lists 1,979 TFLOPS with sparsity",
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
    sources={
        "peak_tflops": "NVIDIA H200 datasheet, H200 SXM: BF16 tensor core 1,979 TFLOPS with "
                       "sparsity, i.e. 989.4 dense (the same GH100 tensor cores as H100 SXM)",
        "memory_gb": "NVIDIA H200 datasheet, H200 SXM: 141 GB HBM3e",
        "hbm_gbps": "NVIDIA H200 datasheet, H200 SXM: 4.8 TB/s",
        "nvlink_gbps": "NVIDIA H200 datasheet, H200 SXM: NVLink 900 GB/s (bidirectional), "
                       "450 GB/s per direction",
        "network_gbps": "NVIDIA DGX H200 datasheet: 8x single-port ConnectX-7, 400 Gb/s "
                        "InfiniBand per GPU = 50 GB/s per direction",
    },
)

PROFILES: Dict[str, HardwareProfile] = {p.name: p for p in (H100_SXM, H200_SXM)}


def get_profile(name: str) -> HardwareProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise FoldingError(f"unknown GPU {name!r}; known: {', '.join(PROFILES)}") from None
