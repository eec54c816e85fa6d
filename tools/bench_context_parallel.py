#!/usr/bin/env python3
"""Benchmark (not a test): context-parallel attention's bytes and kept memory against the
formulas of ``folding.cost.context_parallel``, for CP 1, 2, 4 and 8 and every cp_comm_type.

One spawn of 8 local gloo ranks; CP c runs on ranks 0..c-1 (a sub-group), the others wait. Each
case runs one attention layer forward and backward on seeded inputs (Megatron's load-balanced
layout, fp32, TP 1). Two tables:

- bytes each rank sent for the layer, forward and backward, counted by the exchange's
  ``ExchangeCounter`` against ``exchange_bytes``, and the forward + backward wall time (median of
  ``--repeats`` runs, slowest rank): CPU gloo, informative only;
- bytes each rank keeps for backward, measured with ``torch.autograd.graph.saved_tensors_hooks``
  (each storage once) against ``saved_bytes``, and the ratio to CP 1 (1/CP expected).

a2a rows whose heads or query groups do not divide by CP are shown as refused, with the reason.
The last line is one JSON object with every figure.

    python tools/bench_context_parallel.py [--seq-len 4096] [--heads 8] [--groups 4]
        [--head-dim 16] [--batch 1] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from folding.commands.common import format_table  # noqa: E402
from folding.cost.context_parallel import exchange_bytes, formula, saved_bytes  # noqa: E402
from folding.run.launch import run_ranks  # noqa: E402
from folding.testing.context_parallel_measure import (AttentionShape, Case,  # noqa: E402
                                                      measure_rank)

RANKS = 8
CP_SIZES = (1, 2, 4, 8)
MODES = ("p2p", "all_gather", "a2a")
MIB = 1024 * 1024


def _same(values, what):
    """The value every rank of a CP group reports (they must agree)."""
    values = set(values)
    if len(values) != 1:
        raise SystemExit(f"the ranks of one CP group disagree on {what}: {sorted(values)}")
    return values.pop()


def _mib(n: int) -> str:
    return f"{n / MIB:.3f}"


def _ratio(measured: int, predicted: int) -> str:
    if predicted == 0:
        return "exact" if measured == 0 else "inf"
    return f"{measured / predicted:.4f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--groups", type=int, default=4, help="query groups (GQA)")
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="micro-batch size")
    parser.add_argument("--repeats", type=int, default=3, help="timed fwd+bwd runs per case")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()

    shape = AttentionShape(seq_length=args.seq_len, batch=args.batch, heads=args.heads,
                           groups=args.groups, head_dim=args.head_dim, dtype="fp32")
    cases = [Case(cp, mode, repeats=args.repeats, tensors=False)
             for cp in CP_SIZES for mode in MODES]
    start = time.time()
    per_rank = run_ranks(measure_rank, RANKS, shape, cases, False, timeout_s=3600)
    seconds = time.time() - start

    rows, byte_rows, memory_rows, refusals = [], [], [], []
    saved_at_cp1 = {}
    for i, case in enumerate(cases):
        ranks = [r["cases"][i] for r in per_rank if r["cases"][i] is not None]
        row = {"cp": case.cp, "mode": case.mode}
        if "refused" in ranks[0]:
            row["refused"] = ranks[0]["refused"]
            rows.append(row)
            refusals.append(f"{case.mode} at CP {case.cp} refused: {row['refused']}")
            byte_rows.append([case.cp, case.mode, "refused"] + ["-"] * 6)
            memory_rows.append([case.cp, case.mode, "refused"] + ["-"] * 3)
            continue
        kwargs = shape.cost_kwargs(case.cp)
        predicted = exchange_bytes(case.mode, **kwargs)
        kept_predicted = saved_bytes(mode=case.mode, **kwargs)
        forward = _same((r["forward_bytes"] for r in ranks), "forward bytes")
        backward = _same((r["backward_bytes"] for r in ranks), "backward bytes")
        kept = _same((r["saved_bytes"] for r in ranks), "bytes kept for backward")
        if case.cp == 1:
            saved_at_cp1[case.mode] = kept
        vs_cp1 = kept / saved_at_cp1[case.mode] if case.mode in saved_at_cp1 else None
        median_s = max(r["median_s"] for r in ranks) if args.repeats else None
        row.update(forward_bytes=forward, forward_predicted=predicted.forward,
                   backward_bytes=backward, backward_predicted=predicted.backward,
                   saved_bytes=kept, saved_predicted=kept_predicted,
                   saved_vs_cp1=vs_cp1,
                   saved_tensors=ranks[0]["saved_tensors"], fwd_bwd_median_s=median_s)
        rows.append(row)
        byte_rows.append([case.cp, case.mode, _mib(forward), _mib(predicted.forward),
                          _ratio(forward, predicted.forward), _mib(backward),
                          _mib(predicted.backward), _ratio(backward, predicted.backward),
                          f"{1000 * median_s:.0f}" if median_s is not None else "-"])
        memory_rows.append([case.cp, case.mode, _mib(kept), _mib(kept_predicted),
                            _ratio(kept, kept_predicted),
                            f"{vs_cp1:.4f}" if vs_cp1 is not None else "-"])

    measured = [r for r in rows if "refused" not in r]
    summary = {
        "bytes_exact": all(r["forward_bytes"] == r["forward_predicted"]
                           and r["backward_bytes"] == r["backward_predicted"] for r in measured),
        "saved_exact": all(r["saved_bytes"] == r["saved_predicted"] for r in measured),
        "refused": sum("refused" in r for r in rows),
        "seconds": seconds,
    }
    if not args.json:
        s = shape
        print(f"context-parallel attention, one layer: seq {s.seq_length}, micro-batch {s.batch}, "
              f"{s.heads} heads, {s.groups} query groups, head dim {s.head_dim}, fp32, TP 1; "
              f"{RANKS} gloo ranks, CP c on ranks 0..c-1\n")
        print("bytes each rank sent (MiB), counted by the exchange vs the formula; "
              f"fwd+bwd time: median of {args.repeats}, slowest rank, CPU gloo on "
              f"{os.cpu_count()} cores (informative only)")
        for mode in MODES:
            print(f"  {mode}: {formula(mode)}")
        print(format_table(["CP", "mode", "fwd counted", "fwd formula", "ratio", "bwd counted",
                            "bwd formula", "ratio", "fwd+bwd ms (CPU gloo)"], byte_rows))
        for line in refusals:
            print(line)
        print("\nbytes each rank keeps for backward (MiB), measured through saved_tensors_hooks "
              "vs saved_bytes (2Q + KV + 4*L*b*H); 'vs CP 1' expects 1/CP")
        print(format_table(["CP", "mode", "measured", "predicted", "ratio", "vs CP 1"],
                           memory_rows))
        for line in refusals:
            print(line)
        print(f"\ncounted bytes equal the formula in every case: {summary['bytes_exact']}; "
              f"kept bytes equal the prediction in every case: {summary['saved_exact']} "
              f"({summary['seconds']:.0f} s)")
    print(json.dumps({"shape": dataclasses.asdict(shape), "ranks": RANKS, "rows": rows,
                      "summary": summary}))
    return 0 if summary["bytes_exact"] and summary["saved_exact"] else 1


if __name__ == "__main__":
    sys.exit(main())
