"""Writes tests/data/megatron_args_sample.log: a Megatron-LM training log whose every model fact
and throughput figure Megatron itself produced.

The log is what pretrain_gpt.py prints on rank 0, made with megatron.training (megatron-core
0.19.2's wheel) and nothing of folding's:

- ``parse_args`` and ``validate_args`` on the hand-written ``MIXTRAL_LIKE`` flags (a
  Mixtral-8x7B-like MoE: GQA, SwiGLU, 8 experts top-2, no --vocab-size, as with a tokenizer):
  validate_args prints "using world size ..." and ends with ``_print_args("arguments", args)``,
  the argument dump;
- the tokenizer's vocabulary padded by ``calculate_padded_vocab_size``, which prints the
  "> padded vocab" line (32000 tokens over TP4: 256 dummy tokens);
- iteration lines in training_log's format whose "throughput per GPU" is
  ``num_floating_point_operations(args, batch) / (seconds per iteration * 1e12 * world size)``,
  printed with one decimal as training_log does; one interval runs at a ramped-up batch of 128.

Run once, with megatron-core 0.19.2, from the repository root (no GPU needed)::

    .venv-mcore019/bin/python tests/data/make_megatron_args_log.py

tests/test_mfu_log.py imports ``megatron_run`` from here to make the same kind of log in memory
in its megatron-marked tests, and checks that the committed file still matches what this script
makes.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

if not hasattr(typing, "override"):  # megatron.training uses Python 3.12's typing.override
    typing.override = lambda f: f

OUTPUT = Path(__file__).with_name("megatron_args_sample.log")

MIXTRAL_LIKE = [
    "--num-layers", "32", "--hidden-size", "4096", "--ffn-hidden-size", "14336",
    "--num-attention-heads", "32", "--group-query-attention", "--num-query-groups", "8",
    "--seq-length", "4096", "--max-position-embeddings", "32768",
    "--position-embedding-type", "rope", "--rotary-base", "1000000",
    "--normalization", "RMSNorm", "--norm-epsilon", "1e-5", "--swiglu",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--attention-dropout", "0.0", "--hidden-dropout", "0.0",
    "--num-experts", "8", "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
    "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
    "--tensor-model-parallel-size", "4", "--pipeline-model-parallel-size", "2",
    "--expert-model-parallel-size", "8", "--expert-tensor-parallel-size", "1",
    "--sequence-parallel", "--use-distributed-optimizer",
    "--micro-batch-size", "1", "--global-batch-size", "256", "--train-iters", "500000",
    "--lr", "3e-4", "--min-lr", "3e-5", "--lr-decay-style", "cosine", "--bf16",
    "--log-interval", "10", "--log-throughput",
]
MIXTRAL_LIKE_WORLD_SIZE = 64
MIXTRAL_LIKE_TOKENIZER_VOCAB = 32000
# (iteration, elapsed ms per iteration with training_log's one decimal, global batch size)
INTERVALS = [(1, 41873.2, 128), (10, 2391.7, 128), (20, 4502.4, 256), (30, 4488.9, 256),
             (40, 4511.3, 256), (50, 4479.6, 256), (60, 4495.0, 256)]


@contextlib.contextmanager
def _as_pretrain_gpt(flags: Sequence[str], env: Dict[str, str]):
    """sys.argv, environment and the CUDA questions of validate_args (answered for an H100) as
    on a rank of the run; everything restored afterwards."""
    import torch

    saved_argv, saved_env = sys.argv, dict(os.environ)
    saved_cuda = torch.cuda.get_device_capability, torch.cuda.get_device_properties
    sys.argv = ["pretrain_gpt.py", *flags]
    os.environ.update(env)
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)
    torch.cuda.get_device_properties = lambda *a, **k: SimpleNamespace(major=9, minor=0, name="H100")
    try:
        yield
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        torch.cuda.get_device_capability, torch.cuda.get_device_properties = saved_cuda


def megatron_run(flags: Sequence[str], world_size: int,
                 tokenizer_vocab_size: Optional[int] = None) -> Tuple[SimpleNamespace, str]:
    """(args, start-up output) of pretrain_gpt.py with ``flags`` on ``world_size`` GPUs:
    Megatron's parse_args and validate_args (which prints "using world size" and the argument
    dump), then the vocabulary padding of a tokenizer of ``tokenizer_vocab_size`` tokens (else of
    --vocab-size), which sets args.padded_vocab_size and prints the "> padded vocab" line."""
    from megatron.training import arguments
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    env = {"WORLD_SIZE": str(world_size), "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    out = io.StringIO()
    with _as_pretrain_gpt(flags, env), contextlib.redirect_stdout(out):
        args = arguments.parse_args()
        arguments.validate_args(args)
        if "-- arguments --" not in out.getvalue():  # a Megatron that prints it elsewhere
            arguments._print_args("arguments", args)
        args.padded_vocab_size = calculate_padded_vocab_size(
            tokenizer_vocab_size or args.vocab_size, args.make_vocab_size_divisible_by,
            args.tensor_model_parallel_size)
    return args, out.getvalue()


def iteration_line(args, iteration: int, elapsed_ms: float, batch: int, consumed: int,
                   second: int) -> str:
    """One training_log line (the format of tests/data/megatron_sample.log), throughput from
    Megatron's num_floating_point_operations on a copy of ``args`` (it rewrites
    num_query_groups)."""
    import copy

    from megatron.training.training import num_floating_point_operations

    flops = num_floating_point_operations(copy.copy(args), batch)
    throughput = flops / (elapsed_ms / 1000.0 * 10**12 * args.world_size)
    return (f" [2025-03-01 10:{second // 60:02d}:{second % 60:02d}.000000] iteration "
            f"{iteration:8d}/{args.train_iters:8d} | consumed samples: {consumed:12d} | "
            f"elapsed time per iteration (ms): {elapsed_ms:.1f} | "
            f"throughput per GPU (TFLOP/s/GPU): {throughput:.1f} | learning rate: 3.000000E-04 | "
            f"global batch size: {batch:5d} | lm loss: 5.000000E+00 | "
            f"load_balancing_loss: 1.010000E+00 | loss scale: 1.0 | grad norm: 2.000 | "
            f"number of skipped iterations:   0 | number of nan iterations:   0 |")


def make_log(flags: Sequence[str] = MIXTRAL_LIKE, world_size: int = MIXTRAL_LIKE_WORLD_SIZE,
             tokenizer_vocab_size: Optional[int] = MIXTRAL_LIKE_TOKENIZER_VOCAB,
             intervals: Sequence[Tuple[int, float, int]] = INTERVALS) -> str:
    args, startup = megatron_run(flags, world_size, tokenizer_vocab_size)
    lines: List[str] = [startup.rstrip("\n"), "training ..."]
    consumed, previous, second = 0, 0, 0
    for iteration, ms, batch in intervals:
        consumed += (iteration - previous) * batch
        second += int((iteration - previous) * ms / 1000)
        lines.append(iteration_line(args, iteration, ms, batch, consumed, second))
        previous = iteration
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import warnings

    warnings.filterwarnings("ignore")
    OUTPUT.write_text(make_log())
    print(f"wrote {OUTPUT}")
