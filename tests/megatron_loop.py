"""Run Megatron's own training loop through ``folding megatron`` from a test (a helper, not a test).

``train(ranks, *flags)`` runs the project's training script (``tests/scripts/pretrain_gpt_minimal.py``,
built on ``megatron.training.pretrain``) on CPU ranks and returns the launcher's JSON: exit
status, failed rank, and Megatron's metrics per iteration. ``MODEL`` and ``TRAINING`` are a small
MoE GPT and its schedule (mock data, no dropout, so two runs of one model agree to the last digit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

import pytest

if TYPE_CHECKING:
    import torch

SCRIPT = Path(__file__).parent / "scripts" / "pretrain_gpt_minimal.py"

MODEL = ("--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 "
         "--max-position-embeddings 64 --position-embedding-type rope --normalization RMSNorm "
         "--swiglu --untie-embeddings-and-output-weights --disable-bias-linear "
         "--ffn-hidden-size 128 --num-experts 4 --moe-router-topk 2 "
         "--moe-token-dispatcher-type alltoall --moe-router-load-balancing-type aux_loss "
         "--moe-aux-loss-coeff 0.01 --attention-dropout 0 --hidden-dropout 0").split()
TRAINING = ("--micro-batch-size 2 --global-batch-size 8 --lr 1e-3 --min-lr 1e-4 "
            "--lr-decay-style cosine --lr-warmup-iters 2 --weight-decay 0.01 --clip-grad 1.0 "
            "--seed 1234 --log-interval 1 --eval-iters 0 --eval-interval 1000 --mock-data "
            "--tokenizer-type NullTokenizer --vocab-size 256").split()


def needs_megatron_training():
    """Skip without ``megatron.training`` (megatron-core 0.16.1's wheel has none)."""
    pytest.importorskip("megatron.training.training",
                        reason="megatron.training is not installed (the megatron-core 0.19.2 "
                               "job runs Megatron's training loop)")


def launch(ranks: int, flags: List[str], env: Optional[Dict[str, Optional[str]]] = None,
           timeout_s: float = 600, script: Path = SCRIPT, log: Optional[Path] = None
           ) -> subprocess.CompletedProcess:
    """``folding megatron --cpu --nproc RANKS --json`` on ``script``; ``env`` adds to this
    process's environment (a value of None removes the variable)."""
    command = [sys.executable, "-m", "folding.cli", "megatron", "--cpu", "--nproc", str(ranks),
               "--json", "--timeout", str(timeout_s)] + (["--log", str(log)] if log else []) + \
        ["--", str(script)] + list(flags)
    environment = {k: v for k, v in dict(os.environ, **(env or {})).items() if v is not None}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s + 60,
                          env=environment)


def refusal(cli, ranks: int, flags: List[str]):
    """``folding megatron --cpu --nproc RANKS`` in this process, for a run its check must refuse
    before any rank starts (Megatron is imported once for all such tests, not once per launch):
    (exit status, stdout, stderr). A check that wrongly passes stops at the timeout."""
    return cli("megatron", "--cpu", "--nproc", str(ranks), "--json", "--timeout", "60", "--",
               str(SCRIPT), *flags)


def indexed_corpus(directory: Path) -> str:
    """The shipped byte-level corpus as Megatron's indexed dataset (one document per paragraph,
    bytes as token ids, as NullTokenizer with vocabulary 256 reads them); returns the prefix
    for ``--data-path``."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    from folding.run.corpus import PACKAGE_DIR

    prefix = str(directory / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for paragraph in (PACKAGE_DIR / "data" / "corpus.txt").read_bytes().split(b"\n\n"):
        if paragraph.strip():
            tokens = np.frombuffer(paragraph, dtype=np.uint8).astype(np.int64)
            builder.add_document(tokens, [len(tokens)])
    builder.finalize(prefix + ".idx")
    return prefix


def train(ranks: int, *flags: str, iterations: int = 20, env=None, log=None,
          data: Optional[str] = None) -> Dict:
    """Train ``iterations`` iterations on mock data, or on the indexed dataset ``data``; the
    launcher's JSON (fails the test if no JSON came)."""
    training = TRAINING if data is None else \
        [f for f in TRAINING if f != "--mock-data"] + ["--data-path", data, "--split", "100,0,0"]
    done = launch(ranks, MODEL + training + ["--train-iters", str(iterations)] + list(flags), env,
                  log=log)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    assert lines, f"no JSON from folding megatron (exit {done.returncode}): {done.stderr[-3000:]}"
    result = json.loads(lines[-1])
    result["stderr"] = done.stderr
    return result


def losses(result: Dict, name: str = "lm loss") -> Dict[int, float]:
    """One loss per iteration; a resumed run's repeated iteration counts as printed last."""
    assert result["exit_status"] == 0, f"training failed: {result['reason']}\n{result['stderr'][-3000:]}"
    return {line["iteration"]: line[name] for line in result["iterations"]}


def largest_relative_difference(a: Dict[int, float], b: Dict[int, float], iterations) -> float:
    missing = [i for i in iterations if i not in a or i not in b]
    assert not missing, f"iterations {missing} missing from a run"
    return max(abs(a[i] - b[i]) / max(abs(a[i]), abs(b[i])) for i in iterations)


def checkpoint_tensors(folder: Path, scratch: Path) -> Dict[str, torch.Tensor]:
    """Every floating-point tensor of one torch_dist checkpoint iteration folder, by its
    checkpoint name (``optimizer.state.exp_avg.<parameter>`` for Adam's moments with
    ``--dist-ckpt-optim-fully-reshardable``), read with torch's own DCP reader, no process group
    needed. Experts are stacked by the expert they are, not by slot."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = scratch / (folder.parent.name + "_" + folder.name + ".pt")
    dcp_to_torch_save(str(folder), str(out))
    loaded = torch.load(out, weights_only=False)
    out.unlink()
    return {k: v for k, v in loaded.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


def largest_tensor_difference(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]
                              ) -> Dict[str, float]:
    """Per tensor name (both must have the same names): max |a - b| / max |b|."""
    assert sorted(a) == sorted(b), f"tensor names differ: {sorted(set(a) ^ set(b))[:5]}"
    return {k: float((a[k].double() - b[k].double()).abs().max()
                     / max(float(b[k].double().abs().max()), 1e-30)) for k in a}
