"""Published training throughput of Megatron-Core MoE runs: what the step-time model is fitted to.

Every row names its source, the model (a recipe of ``folding/recipes``), the folding, sequence
length, global and micro-batch size, VPP, recompute and precision. Where a source leaves a
detail out, the row's ``assumed`` says what was assumed, and ``checked`` says how far the row was
checked against its source. MFU is Megatron's model FLOPs (``folding.cost.flops``) per second per
GPU over the dense BF16 peak, 989.4 TFLOP/s on H100 SXM, for FP8 rows too; rows published in
TFLOP/s per GPU are converted with that peak.

Sources:

- PAPER: Liu et al. 2025, "MoE Parallel Folding: Heterogeneous Parallelism Mappings for
  Efficient Large-Scale MoE Model Training with Megatron Core", arXiv 2504.14960, Tables 3
  (folded vs unfolded, 4K sequence) and 4 (scaling at a fixed mapping). H100 SXM, 8 per node.
- MODELZOO: NVIDIA's Megatron-MoE-ModelZoo (github.com/yanring/Megatron-MoE-ModelZoo),
  best_practice/Mixtral/run_mixtral_8x22B.sh and model_configs/benchmarking/Mixtral-8x22B.yaml.
- MCORE_README: Megatron-LM's megatron/core/transformer/moe/README.md (core_r0.15.0).
- BRIDGE: NVIDIA Megatron-Bridge performance summary
  (docs.nvidia.com/nemo/megatron-bridge/latest/performance-summary.html, the repository's
  docs/performance-summary.md), DGX-H100 FP8 rows. Its MoE benchmarks force-balance the routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

H100_BF16_PEAK_TFLOPS = 989.4

PAPER = "arXiv 2504.14960 (MoE Parallel Folding)"
MODELZOO = "Megatron-MoE-ModelZoo best_practice/Mixtral/run_mixtral_8x22B.sh"
MCORE_README = "Megatron-LM megatron/core/transformer/moe/README.md (core_r0.15.0)"
BRIDGE = "Megatron-Bridge performance summary"


@dataclass(frozen=True)
class PublishedRow:
    """One published measurement and the setup it was measured with."""

    key: str
    """Short unique name of the row."""
    source: str
    where: str
    """Table or line of the source."""
    recipe: str
    gpus: int
    tp: int
    pp: int
    ep: int
    etp: int
    vpp: Optional[int]
    mfu: float
    """Published MFU as a fraction (or published TFLOP/s per GPU / 989.4)."""
    seq_length: int = 4096
    global_batch_size: int = 256
    micro_batch_size: int = 1
    recompute: str = "none"
    precision: str = "bf16"
    cp: int = 1
    gpu: str = "h100-sxm"
    gpus_per_node: int = 8
    pair: Optional[Tuple[str, str]] = None
    """(pair name, "folded" or "unfolded") for the paper's Table 3 pairs."""
    pipeline_layers: Optional[int] = None
    """Where the source uses an uneven pipeline layout FoldingSpec cannot express: the layer
    count whose even split gives its busiest stage as many layers (the FLOPs stay the model's)."""
    ep_overlap: bool = False
    """The run overlaps the expert all-to-all with compute (--overlap-moe-expert-parallel-comm)."""
    force_balance: bool = False
    """The run forces balanced routing (--moe-router-force-load-balancing), as the Bridge's
    dropless benchmarks state: every expert gets the mean token count, no routing imbalance."""
    assumed: str = ""
    checked: str = ""

    @property
    def tflops_per_gpu(self) -> float:
        return self.mfu * H100_BF16_PEAK_TFLOPS


_PAPER_CHECK = ("headline 49.3% (Mixtral 8x22B) and 39.0% (Qwen2-57B-A14B) checked in the paper's "
                "abstract (arxiv.org/html/2504.14960v2); the table rows themselves were taken from "
                "a third-party copy of Tables 3 and 4 and could not be re-read from the paper here")
_T3 = ("Table 3 gives TP, EP, ETP and PP; VPP is not given: one layer per virtual stage assumed, "
       "as the authors' model zoo scripts use for Mixtral 8x22B (VPP 7) and Qwen2-57B-A14B "
       "(VPP 7); global batch 256, micro-batch 1, no recompute, BF16, dropless alltoall")
_UNFOLDED = "; unfolded: ETP = TP and EP within DP (Megatron without folding)"
_T4 = ("Table 4 keeps the mapping as the workload grows: global batch assumed to grow with the "
       "GPU count (256 per 128 GPUs for Mixtral, per 64 GPUs for Qwen2), micro-batch 1; VPP as "
       "Table 3")

ROWS: Tuple[PublishedRow, ...] = (
    # ---------------------------------------------------------------- Table 3, folded vs not
    PublishedRow("t3-mixtral-8x22b-folded", PAPER, "Table 3", "mixtral-8x22b", 128, tp=2, pp=8,
                 ep=8, etp=1, vpp=7, mfu=0.493, pair=("mixtral-8x22b", "folded"),
                 assumed=_T3, checked=_PAPER_CHECK),
    PublishedRow("t3-mixtral-8x22b-unfolded", PAPER, "Table 3", "mixtral-8x22b", 128, tp=2,
                 pp=8, ep=4, etp=2, vpp=7, mfu=0.463, pair=("mixtral-8x22b", "unfolded"),
                 assumed=_T3 + _UNFOLDED, checked=_PAPER_CHECK),
    PublishedRow("t3-qwen2-57b-folded", PAPER, "Table 3", "qwen2-57b-a14b", 64, tp=2, pp=4, ep=4,
                 etp=1, vpp=7, mfu=0.390, pair=("qwen2-57b-a14b", "folded"),
                 assumed=_T3, checked=_PAPER_CHECK),
    PublishedRow("t3-qwen2-57b-unfolded", PAPER, "Table 3", "qwen2-57b-a14b", 64, tp=2, pp=4,
                 ep=4, etp=2, vpp=7, mfu=0.353, pair=("qwen2-57b-a14b", "unfolded"),
                 assumed=_T3 + _UNFOLDED + " (EP 4 of DP 8)", checked=_PAPER_CHECK),
    PublishedRow("t3-mixtral-g8t8-folded", PAPER, "Table 3", "mixtral-8x22b-g8t8", 128, tp=4,
                 pp=8, ep=8, etp=1, vpp=7, mfu=0.288, pair=("mixtral-8x22b-g8t8", "folded"),
                 assumed=_T3 + "; G8T8 = 64 experts of 2048, top-8", checked=_PAPER_CHECK),
    PublishedRow("t3-mixtral-g8t8-unfolded", PAPER, "Table 3", "mixtral-8x22b-g8t8", 128, tp=4,
                 pp=8, ep=4, etp=4, vpp=7, mfu=0.171, pair=("mixtral-8x22b-g8t8", "unfolded"),
                 assumed=_T3 + _UNFOLDED + " (DP 4 bounds EP to 4)", checked=_PAPER_CHECK),
    PublishedRow("t3-llama3-8x70b-folded", PAPER, "Table 3", "llama3-8x70b", 256, tp=8, pp=16,
                 ep=8, etp=1, vpp=5, mfu=0.416, pair=("llama3-8x70b", "folded"),
                 assumed=_T3.replace("(VPP 7); ", "(VPP 7), here VPP 5; "),
                 checked=_PAPER_CHECK),
    PublishedRow("t3-llama3-8x70b-unfolded", PAPER, "Table 3", "llama3-8x70b", 256, tp=8,
                 pp=16, ep=2, etp=8, vpp=5, mfu=0.388, pair=("llama3-8x70b", "unfolded"),
                 assumed=_T3.replace("(VPP 7); ", "(VPP 7), here VPP 5; ") + _UNFOLDED
                 + " (DP 2 bounds EP to 2)", checked=_PAPER_CHECK),
    # ---------------------------------------------------------------- Table 4, scaling
    PublishedRow("t4-mixtral-8x22b-128", PAPER, "Table 4", "mixtral-8x22b", 128, tp=2, pp=8,
                 ep=8, etp=1, vpp=7, mfu=0.522, assumed=_T4, checked=_PAPER_CHECK),
    PublishedRow("t4-mixtral-8x22b-256", PAPER, "Table 4", "mixtral-8x22b", 256, tp=2, pp=8,
                 ep=8, etp=1, vpp=7, mfu=0.507, global_batch_size=512, assumed=_T4,
                 checked=_PAPER_CHECK),
    PublishedRow("t4-qwen2-57b-64", PAPER, "Table 4", "qwen2-57b-a14b", 64, tp=2, pp=4, ep=4,
                 etp=1, vpp=7, mfu=0.399, assumed=_T4, checked=_PAPER_CHECK),
    PublishedRow("t4-qwen2-57b-1024", PAPER, "Table 4", "qwen2-57b-a14b", 1024, tp=2, pp=4,
                 ep=4, etp=1, vpp=7, mfu=0.334, global_batch_size=4096, assumed=_T4,
                 checked=_PAPER_CHECK),
    # ---------------------------------------------------------------- model zoo, READMEs
    PublishedRow("modelzoo-mixtral-8x22b", MODELZOO, "comment on the dropless run",
                 "mixtral-8x22b", 128, tp=2, pp=8, ep=8, etp=1, vpp=7,
                 mfu=455 / H100_BF16_PEAK_TFLOPS,
                 assumed=("TP2 PP8 VPP7 EP8 ETP1, GBS 256, MBS 1, 4K from the script's runtime "
                          "settings; no recompute (the model config sets none); dropless "
                          "alltoall"),
                 checked=("read in the stored copy of run_mixtral_8x22B.sh (commit 0993e66): "
                          "'Dropless training, stable performance should be around 455TFLOPS for "
                          "H100', token drop 470; another version is quoted as 445 dropless / 465 "
                          "forced balance / 470 token drop: 455 used")),
    PublishedRow("mcore-readme-mixtral-8x7b", MCORE_README, "performance line",
                 "mixtral-8x7b", 64, tp=1, pp=4, ep=8, etp=1, vpp=8,
                 mfu=468 / H100_BF16_PEAK_TFLOPS,
                 assumed="GBS 256, MBS 1, 4K, no recompute (not stated with the figure)",
                 checked=("468 TFLOPS (MCore 0.9) as in the project's anchors; the README copies "
                          "found here state 438 TFLOPS for MCore v0.8, the 468 line was not "
                          "re-read")),
    # ---------------------------------------------------------------- FP8
    PublishedRow("bridge-deepseek-v3-fp8", BRIDGE, "25.09 container, DGX-H100 table",
                 "deepseek-v3", 1024, tp=2, pp=8, ep=64, etp=1, vpp=4,
                 mfu=338 / H100_BF16_PEAK_TFLOPS, global_batch_size=8192, recompute="selective",
                 precision="fp8", pipeline_layers=64, ep_overlap=True, force_balance=True,
                 assumed=("the published layout puts 61 layers, the MTP layer and the loss "
                          "unevenly on 32 virtual stages with at most 8 layers per rank: costed "
                          "as an even 64-layer split; selective recompute of MLA up-projections "
                          "and MLPs costed as the model's selective (core attention) recompute; "
                          "DeepEP dispatch costed as alltoall, overlapped with compute as the "
                          "model zoo's DeepSeek-V3 guide enables (--overlap-moe-expert-parallel-"
                          "comm)"),
                 checked=("read in the stored docs/performance-summary.md of NVIDIA-NeMo/"
                          "Megatron-Bridge, 25.09 NeMo container, DGX-H100: 'DeepSeekV3 "
                          "(dropless)', 1024 GPUs, GBS 8192, MBS 1, 4096, TP2 PP8 CP1 VP4 EP64, "
                          "GA 128, 1297 tokens/s/GPU, 338 (330 with 128x128 / 1x128 FP8 "
                          "blocks) TFLOP/s; 'In token-dropless MoE training benchmarks, we "
                          "force-balance the token distribution among experts'")),
    # Source: Megatron-Bridge docs/performance-summary.md (stored copy), DGX-H100, Qwen3_30B_a3B
    # on 16 GPUs, FP8, 4096 tokens, TP1 PP2 CP1 EP8, force-balanced and dropless:
    #   25.11 container: GBS 512, MBS 2, VP 24, 121 TFLOP/s (5275 tokens/s/GPU)
    #   26.02 container: GBS 1024, MBS 1, VP 12, 118 TFLOP/s (2557 tokens/s/GPU: half the
    #   TFLOP/s its own token rate gives, 0.046 TFLOP per token against 0.023 in the others)
    #   26.02.01 container: the same setup as 26.02, 208 TFLOP/s (9058 tokens/s/GPU)
    # The row takes the newest publication of the setup (26.02.01). The row used before, 118
    # TFLOP/s with GBS 512 assumed, was the 26.02 figure with the wrong global batch: the same
    # setup measured 1.76x faster one container later, so no software-agnostic model fits both.
    PublishedRow("bridge-qwen3-30b-a3b-fp8", BRIDGE, "26.02.01 container, Qwen3_30B_a3B table",
                 "qwen3-30b-a3b", 16, tp=1, pp=2, ep=8, etp=1, vpp=12,
                 mfu=208 / H100_BF16_PEAK_TFLOPS, global_batch_size=1024, micro_batch_size=1,
                 precision="fp8", force_balance=True,
                 assumed="no recompute (the table does not say)",
                 checked=("read in the stored docs/performance-summary.md of NVIDIA-NeMo/"
                          "Megatron-Bridge: DGX-H100, 16 GPUs, FP8, GBS 1024, MBS 1, 4096, TP1 "
                          "PP2 CP1 VP12 EP8, 9058 tokens/s/GPU, 208 TFLOP/s (26.02.01; 118 in "
                          "26.02, 121 in 25.11 with GBS 512, MBS 2, VP 24); MoE benchmarks "
                          "force-balanced and dropless")),
)


def table3_pairs():
    """{pair name: (folded row, unfolded row)} of the paper's Table 3."""
    pairs = {}
    for row in ROWS:
        if row.pair:
            pairs.setdefault(row.pair[0], {})[row.pair[1]] = row
    return {name: (p["folded"], p["unfolded"]) for name, p in pairs.items()}
