"""Import the JSONL routing traces of Megatron-Core's router tracer into a ``RoutingTrace``.

Megatron-Core 0.19 (``megatron/core/transformer/moe/router_trace.py``, switched on by
``--moe-routing-trace-path DIR`` in megatron.training) writes ``router_trace_rank{R}.jsonl`` per
rank, one JSON object per line and per (step, router call)::

    {"step": 12, "stage": "pre_dispatch", "block": "decoder", "layer": 3, "rank": 0,
     "num_tokens": 4096, "topk": 2, "top_indices": [[5, 17], [0, 3], ...]}

- ``step``: the training iteration (``advance_step(iteration)``) or the inference decode step;
- ``block``: ``"decoder"`` or ``"mtp"`` (MTP records carry ``mtp_idx`` too);
- ``layer``: in training, the index in ``decoder.layers.<n>`` of the router's module name, i.e.
  the layer's index *inside its pipeline stage*; in inference, the layer number given to
  ``record_indices``;
- ``top_indices``: ``num_tokens`` lists of ``topk`` expert ids. In training the tracer takes them
  from the boolean routing map, so each token's experts are in ascending id order, not by score;
- optional sidecar metadata (``hs_offset``/``hs_bytes``/``hs_shape``, ``logit_offset``/
  ``logit_bytes``/``logit_shape``); ``logit_shape`` is [num_tokens, num_experts], the only place
  the expert count appears.

No record says which micro-batch it belongs to: within one step, every router fires once per
forward of a micro-batch (and once more per activation recomputation), in the same order at every
layer of a rank. So a token is identified by (file, step, n, position), n being the record's
occurrence number among the records of its layer in that step: the n-th record of layer a and the
n-th record of layer b of a step hold the same tokens. When the layers of a step do not all have
the same number of records (the tracer skips a call whose routing map does not hold exactly top-k
experts per token, e.g. with capacity-based token dropping), or the n-th records disagree on
``num_tokens``, nothing says which micro-batch lacks a record: that whole step cannot be aligned,
and its records are dropped and counted. MTP records are skipped (and counted): they route
different (shifted) tokens.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from folding.errors import FoldingError
from folding.placement.trace import RoutingTrace

REQUIRED = ("step", "layer", "rank", "num_tokens", "topk", "top_indices")


@dataclass
class ImportReport:
    """What ``import_megatron_trace`` read, kept and dropped."""

    files: List[str]
    records: int = 0
    """Decoder records read."""
    layer_ids: List[int] = field(default_factory=list)
    """The Megatron layer numbers, in the order of the trace's layers."""
    steps: int = 0
    """Distinct (file, step) pairs that contributed tokens."""
    groups: int = 0
    """Aligned (file, step, micro-batch) groups kept."""
    dropped_records: int = 0
    dropped_tokens: int = 0
    """Tokens of the dropped steps (per step, the most tokens any one layer recorded)."""
    skipped_mtp_records: int = 0
    experts_inferred: bool = False
    """True when the expert count is the largest id + 1 (no --experts, no logit_shape)."""

    def as_dict(self) -> dict:
        return {"files": self.files, "records": self.records, "layer_ids": self.layer_ids,
                "steps": self.steps, "groups": self.groups, "dropped_records": self.dropped_records,
                "dropped_tokens": self.dropped_tokens, "skipped_mtp_records": self.skipped_mtp_records,
                "experts_inferred": self.experts_inferred}


def _int(record: dict, key: str, where: str, minimum: int = 0) -> int:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FoldingError(f"{where}: {key!r} must be an integer >= {minimum}, not {value!r}")
    return value


def _read_records(path: Path, state: dict) -> Tuple[List[dict], int]:
    """Parse and check one JSONL file: (decoder records, MTP records skipped)."""
    records, mtp = [], 0
    try:
        handle = open(path, "r", encoding="utf-8")
    except OSError as e:
        raise FoldingError(f"cannot read {path}: {e.strerror or e}") from None
    with handle:
        for number, line in enumerate(handle, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise FoldingError(f"{where}: not a JSON line ({e.msg} at column {e.colno}); "
                                   f"is this a Megatron router trace (.jsonl)?") from None
            if not isinstance(record, dict):
                raise FoldingError(f"{where}: a JSON {type(record).__name__}, not a router-trace record")
            missing = [key for key in REQUIRED if key not in record]
            if missing:
                raise FoldingError(f"{where}: record lacks {', '.join(map(repr, missing))}")
            block = record.get("block", "decoder")
            if block == "mtp" or "mtp_idx" in record:
                mtp += 1
                continue
            if block != "decoder":
                raise FoldingError(f"{where}: unknown block {block!r} (expected 'decoder' or 'mtp')")
            step, layer = _int(record, "step", where), _int(record, "layer", where)
            num_tokens, topk = _int(record, "num_tokens", where), _int(record, "topk", where, 1)
            if state["topk"] is None:
                state["topk"], state["topk_where"] = topk, where
            elif topk != state["topk"]:
                raise FoldingError(f"{where}: top-k {topk} differs from top-k {state['topk']} "
                                   f"of {state['topk_where']}")
            if "logit_shape" in record:
                shape = record["logit_shape"]
                if (not isinstance(shape, list) or len(shape) != 2
                        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)):
                    raise FoldingError(f"{where}: logit_shape must be [num_tokens, num_experts], not {shape!r}")
                if state["experts"] is None:
                    state["experts"], state["experts_where"] = shape[1], f"{where} (logit_shape)"
                elif shape[1] != state["experts"]:
                    raise FoldingError(f"{where}: logit_shape gives {shape[1]} experts, but "
                                       f"{state['experts_where']} gives {state['experts']}")
            try:
                ids = np.asarray(record["top_indices"])
            except ValueError:
                ids = None
            if num_tokens == 0 and ids is not None and ids.size == 0:
                ids = np.zeros((0, topk), dtype=np.int64)
            if ids is None or ids.shape != (num_tokens, topk) or not (
                    ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
                found = "a ragged list" if ids is None else f"{list(ids.shape)} of {ids.dtype}"
                raise FoldingError(f"{where}: top_indices must be {num_tokens} lists of {topk} integer "
                                   f"expert ids (num_tokens x topk), not {found}")
            if ids.size:
                if ids.min() < 0:
                    raise FoldingError(f"{where}: negative expert id {int(ids.min())} in top_indices")
                if state["experts"] is not None and ids.max() >= state["experts"]:
                    raise FoldingError(f"{where}: expert id {int(ids.max())} is outside [0, "
                                       f"{state['experts']}) set by {state['experts_where']}")
                if topk > 1:
                    ordered = np.sort(ids, axis=1)
                    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
                    if repeated.any():
                        t = int(np.argmax(repeated))
                        raise FoldingError(f"{where}: token {t} repeats an expert in its top-k {ids[t].tolist()}")
                state["max_id"] = max(state["max_id"], int(ids.max()))
            records.append({"step": step, "layer": layer, "num_tokens": num_tokens,
                            "ids": ids.astype(np.int32), "where": where})
    return records, mtp


def import_megatron_trace(paths: Union[str, Path, Sequence[Union[str, Path]]],
                          num_experts: Optional[int] = None) -> Tuple[RoutingTrace, ImportReport]:
    """Read Megatron router-trace JSONL files (one per rank) into one ``RoutingTrace``.

    The trace's layers are the decoder layer numbers found, in increasing order; all files must
    hold the same layers (ranks of one pipeline stage: data, expert or tensor parallel replicas),
    their tokens are concatenated in file order. ``num_experts`` defaults to the records'
    ``logit_shape`` or, failing that, the largest expert id + 1.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    paths = [Path(p) for p in paths]
    if num_experts is not None and num_experts < 1:
        raise FoldingError(f"--experts must be positive, not {num_experts}")
    state = {"topk": None, "topk_where": None, "experts": num_experts, "experts_where": "--experts",
             "max_id": -1}
    report = ImportReport(files=[str(p) for p in paths])
    per_file = []
    layer_set = None
    for path in paths:
        if not path.is_file():
            raise FoldingError(f"trace {path} does not exist")
        records, mtp = _read_records(path, state)
        report.skipped_mtp_records += mtp
        report.records += len(records)
        if not records:
            continue
        layers = sorted({r["layer"] for r in records})
        if layer_set is None:
            layer_set, first = layers, path
        elif layers != layer_set:
            raise FoldingError(f"{path}: holds layers {layers} but {first} holds {layer_set}; import "
                               f"files of one pipeline stage together (layer ids are per stage)")
        per_file.append(records)
    if layer_set is None:
        raise FoldingError(f"{', '.join(map(str, paths))}: no decoder routing records")
    report.layer_ids = layer_set

    chunks: List[np.ndarray] = []
    for records in per_file:
        steps: "OrderedDict[int, Dict[int, List[dict]]]" = OrderedDict()
        for record in records:
            steps.setdefault(record["step"], {}).setdefault(record["layer"], []).append(record)
        for step, by_layer in steps.items():
            counts = {len(by_layer.get(layer, [])) for layer in layer_set}
            aligned = len(counts) == 1 and all(
                len({by_layer[layer][n]["num_tokens"] for layer in layer_set}) == 1
                for n in range(counts.pop()))
            if not aligned:
                # Some layer lacks a record (or sizes disagree) and nothing says which
                # micro-batch: no record of this step can be matched safely.
                report.dropped_records += sum(len(rs) for rs in by_layer.values())
                report.dropped_tokens += max(sum(r["num_tokens"] for r in rs) for rs in by_layer.values())
                continue
            report.steps += 1
            for n in range(len(by_layer[layer_set[0]])):
                report.groups += 1
                chunks.append(np.stack([by_layer[layer][n]["ids"] for layer in layer_set]))
    chunks = [c for c in chunks if c.shape[1]]
    if not chunks:
        raise FoldingError(f"{', '.join(map(str, paths))}: no token could be aligned across all "
                           f"{len(layer_set)} MoE layers ({report.dropped_records} records dropped)")
    topk = np.concatenate(chunks, axis=1)
    if state["experts"] is None:
        report.experts_inferred = True
        experts = state["max_id"] + 1
    else:
        experts = state["experts"]
    return RoutingTrace(topk, experts).validate(source=", ".join(map(str, paths))), report
