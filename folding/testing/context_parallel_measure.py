"""Measure context-parallel attention on gloo ranks: its outputs and gradients, the bytes it
sends and the memory it keeps for backward, next to what ``folding.cost.context_parallel``
predicts; and the same attention on the whole sequence by Megatron-Core's own
``DotProductAttention``, the independent reference.

Unlike the cost models this module has side effects: it builds process groups, runs
``folding.context_parallel.attention.context_parallel_attention`` forward and backward, and (for
the reference) Megatron's parallel state. Its functions run inside the ranks of
``folding.run.launch.run_ranks`` and return plain Python and numpy values:

- ``measure_rank``: the rank body. Every rank draws the same seeded q, k, v and output gradient
  for the whole sequence (``AttentionShape.inputs``); for each ``Case`` (CP size, mode) the
  ranks 0..CP-1 of the spawn form the CP group (one ``new_group`` per CP size, so one spawn of 8
  ranks measures CP 1, 2, 4 and 8), take their positions of Megatron's load-balanced layout
  (``layout.rank_positions``) and run forward and backward. A case returns per rank the
  positions, out, dq, dk, dv, the bytes the ``ExchangeCounter`` counted forward and backward,
  the bytes kept for backward and, when asked, the fwd+bwd wall time of a few repeats.
- ``saved_for_backward``: the bytes autograd keeps from a forward for its backward, seen through
  ``torch.autograd.graph.saved_tensors_hooks``: every tensor an operation or custom autograd
  Function saves, each storage once (``untyped_storage().data_ptr()``; a saved view keeps its
  whole storage alive). What is measured is the forward of the CP attention alone.
- ``megatron_reference``: out and the gradients of q, k, v for the whole sequence on one
  process, by ``megatron.core.transformer.dot_product_attention.DotProductAttention`` with its
  causal mask, in float64 on the same (fp32-rounded) inputs.

``measure_rank(..., reference=True)`` also computes the reference on rank 0 of the spawn after
the cases (every rank takes part in building Megatron's parallel state; rank 0 alone computes).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer's sizes (TP 1) and the seed of its inputs."""

    seq_length: int = 4096
    batch: int = 1
    heads: int = 8
    groups: int = 4
    head_dim: int = 16
    dtype: str = "fp32"
    """Element type of q, k, v in the CP run."""
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def inputs(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [S, b, heads, d], k and v [S, b, groups, d] and the output gradient [S, b, heads, d]
        for the whole sequence, float64, the same on every rank."""
        g = torch.Generator().manual_seed(self.seed)
        S, b, h, n, d = self.seq_length, self.batch, self.heads, self.groups, self.head_dim
        q = torch.randn(S, b, h, d, generator=g, dtype=torch.float64)
        k = torch.randn(S, b, n, d, generator=g, dtype=torch.float64)
        v = torch.randn(S, b, n, d, generator=g, dtype=torch.float64)
        dout = torch.randn(S, b, h, d, generator=g, dtype=torch.float64)
        return q, k, v, dout

    def cost_kwargs(self, cp: int) -> Dict[str, int]:
        """The keyword arguments of ``exchange_bytes`` and ``saved_bytes`` for CP ``cp``."""
        return dict(seq_length=self.seq_length, micro_batch_size=self.batch,
                    num_attention_heads=self.heads, num_query_groups=self.groups,
                    head_dim=self.head_dim, tp=1, cp=cp, element_bytes=self.element_bytes)


@dataclass(frozen=True)
class Case:
    """One measurement: CP size and mode; ``repeats`` timed fwd+bwd runs after the measured one;
    ``tensors``: return out, dq, dk, dv; ``backward``: run the backward (without it only the
    forward's bytes and the memory kept for backward are measured)."""

    cp: int
    mode: str
    repeats: int = 0
    tensors: bool = True
    backward: bool = True


def refusal(shape: AttentionShape, case: Case) -> Optional[str]:
    """Why ``case`` cannot run on ``shape`` (the cost model's own check, e.g. a2a with heads not
    divisible by CP); None if it can."""
    from folding.context_parallel.layout import sequence_length_problems
    from folding.cost.context_parallel import exchange_bytes
    from folding.errors import FoldingError

    problems = sequence_length_problems(shape.seq_length, case.cp)
    if problems:
        return problems[0]
    try:
        exchange_bytes(case.mode, **shape.cost_kwargs(case.cp))
    except FoldingError as e:
        return str(e)
    return None


@dataclass
class SavedTensors:
    """What autograd kept for backward during a forward: each distinct storage once."""

    storages: Dict[int, int] = field(default_factory=dict)
    """data_ptr -> nbytes of every distinct storage saved."""
    tensors: List[Tuple[Tuple[int, ...], str, int]] = field(default_factory=list)
    """(shape, dtype, data_ptr of its storage) of every tensor saved, in order."""

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    def bytes_of(self, *tensors: torch.Tensor) -> int:
        """Bytes of the saved storages that are those of ``tensors``."""
        ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        return sum(n for p, n in self.storages.items() if p in ptrs)


@contextlib.contextmanager
def saved_for_backward():
    """``with saved_for_backward() as saved:`` records in ``saved`` every tensor autograd saves
    inside the block."""
    saved = SavedTensors()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved.storages.setdefault(storage.data_ptr(), storage.nbytes())
        saved.tensors.append((tuple(t.shape), str(t.dtype).replace("torch.", ""),
                              storage.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64 if t.is_floating_point() else t.dtype).numpy().copy()


def _run_case(shape: AttentionShape, case: Case, group, inputs) -> Dict[str, Any]:
    """Forward and backward of one case on this rank of ``group``."""
    import torch.distributed as dist

    from folding.context_parallel.attention import context_parallel_attention
    from folding.context_parallel.exchange import ExchangeCounter
    from folding.context_parallel.layout import rank_positions

    cp_rank = dist.get_rank(group)
    positions = rank_positions(shape.seq_length, case.cp, cp_rank)
    q, k, v, dout = (t[positions].to(shape.torch_dtype).contiguous() for t in inputs)

    def leaves():
        return [t.clone().requires_grad_() for t in (q, k, v)]

    ql, kl, vl = leaves()
    counter = ExchangeCounter()
    with saved_for_backward() as saved:
        out = context_parallel_attention(ql, kl, vl, group, case.mode, counter=counter)
    forward_bytes = counter.forward
    if case.backward:
        out.backward(dout)
    result: Dict[str, Any] = {
        "cp": case.cp, "mode": case.mode, "cp_rank": cp_rank,
        "forward_bytes": forward_bytes,
        "backward_bytes": counter.backward if case.backward else None,
        "calls": list(counter.calls),
        "saved_bytes": saved.total,
        "saved_kv_bytes": saved.bytes_of(kl, vl),
        "saved_tensors": [(list(s), dt) for s, dt, _ in saved.tensors],
    }
    if case.tensors and case.backward:
        result.update(positions=positions.numpy().copy(), out=_numpy(out), dq=_numpy(ql.grad),
                      dk=_numpy(kl.grad), dv=_numpy(vl.grad))
    del out, saved
    seconds = []
    for _ in range(case.repeats):
        ql, kl, vl = leaves()
        dist.barrier(group)
        start = time.perf_counter()
        context_parallel_attention(ql, kl, vl, group, case.mode).backward(dout)
        seconds.append(time.perf_counter() - start)
    if seconds:
        result["seconds"] = seconds
        result["median_s"] = statistics.median(seconds)
    return result


def measure_rank(rank: int, world: int, shape: AttentionShape, cases: Sequence[Case],
                 reference: bool = False) -> Dict[str, Any]:
    """The rank body: each case on ranks 0..CP-1 (the others wait), then, with ``reference``,
    Megatron's attention on rank 0. Returns {"cases": [result or None per case],
    "reference": {...} on rank 0 with ``reference``}."""
    import torch.distributed as dist

    groups = {}
    for cp in sorted({c.cp for c in cases}):
        if cp > world:
            raise ValueError(f"CP={cp} needs {cp} ranks; the spawn has {world}")
        groups[cp] = dist.new_group(list(range(cp)))  # every rank creates every group
    inputs = shape.inputs()
    results: List[Optional[Dict[str, Any]]] = []
    for case in cases:
        why = refusal(shape, case)
        if why is not None:
            results.append({"cp": case.cp, "mode": case.mode, "refused": why} if rank < case.cp
                           else None)
        elif rank < case.cp:
            results.append(_run_case(shape, case, groups[case.cp], inputs))
        else:
            results.append(None)
        dist.barrier()
    out: Dict[str, Any] = {"cases": results}
    if reference:
        from megatron.core import parallel_state as ps

        from folding.megatron.cpu_runtime import cpu_runtime

        with cpu_runtime():
            ps.initialize_model_parallel()
            try:
                if rank == 0:
                    out["reference"] = megatron_reference(shape, inputs)
                dist.barrier()
            finally:
                ps.destroy_model_parallel()
    return out


def megatron_reference(shape: AttentionShape, inputs=None,
                       dtype: torch.dtype = torch.float64) -> Dict[str, np.ndarray]:
    """out, dq, dk, dv of causal attention over the whole sequence by Megatron-Core's
    ``DotProductAttention`` in ``dtype``, on the inputs the CP run gets (rounded to
    ``shape.dtype``), so a comparison sees only the CP run's own arithmetic. Needs Megatron's
    parallel state (TP 1, CP 1) and, on a CPU, the CPU runtime
    (``folding.megatron.cpu_runtime``)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    model_parallel_cuda_manual_seed(shape.seed)
    config = TransformerConfig(num_layers=1, hidden_size=shape.heads * shape.head_dim,
                               num_attention_heads=shape.heads, num_query_groups=shape.groups,
                               kv_channels=shape.head_dim, attention_dropout=0.0,
                               params_dtype=dtype, masked_softmax_fusion=False)
    attention = DotProductAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                                    attention_type="self")
    q, k, v, dout = (t.to(shape.torch_dtype).to(dtype)
                     for t in (inputs if inputs is not None else shape.inputs()))
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, attention_mask=None)  # [S, b, heads * d]
    out = out.view(dout.shape)
    out.backward(dout)
    return {"out": _numpy(out), "dq": _numpy(q.grad), "dk": _numpy(k.grad), "dv": _numpy(v.grad)}


def assemble(rank_results: Sequence[Optional[Dict[str, Any]]], seq_length: int,
             positions: Optional[Sequence[np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The whole-sequence out, dq, dk, dv from the CP ranks' results of one case, each rank's
    rows put at its positions (or at ``positions[i]`` for the i-th rank, to test the checker)."""
    ranks = [r for r in rank_results if r is not None]
    full = {}
    for name in ("out", "dq", "dk", "dv"):
        first = ranks[0][name]
        full[name] = np.full((seq_length,) + first.shape[1:], np.nan)
        for i, r in enumerate(ranks):
            full[name][positions[i] if positions is not None else r["positions"]] = r[name]
    return full


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (NaN anywhere, e.g. a position no rank filled, gives inf)."""
    diff = np.linalg.norm(a - b)
    return float("inf") if not np.isfinite(diff) else float(diff / np.linalg.norm(b))
