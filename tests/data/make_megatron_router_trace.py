"""Writes tests/data/megatron_router_trace.jsonl with Megatron-Core 0.19's own router tracer.

The file is what ``megatron.core.transformer.moe.router_trace.RouterTracer`` writes during
training (``--moe-routing-trace-path``), made without a model or a training loop: the tracer's
forward hooks (``make_hook`` with the router module names a GPT model has) are called with the
(probs, routing_map) pair a ``TopKRouter`` returns, and ``advance_step(iteration)`` closes each
iteration as train_step does. The routing comes from ``routing_events()`` (numpy only, seeded), so
tests/test_trace_import.py can rebuild the expected top-k without megatron:

- iteration 5: two micro-batches (6 and 4 tokens) through decoder layers 0-3, plus one MTP record;
- iteration 6: one micro-batch of 5 tokens, then one of 3 tokens that only reaches layers 0-2
  (as when the tracer skips a call): layer 3 has fewer records than the others and nothing says
  which micro-batch lacks one, so the whole iteration is dropped (7 records, 8 tokens);
- step 7: 7 tokens handed over by ``record_indices`` (the inference path), order kept as given.

Run once, with megatron-core 0.19.2, from the repository root (no GPU needed)::

    .venv-mcore019/bin/python tests/data/make_megatron_router_trace.py
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import List

import numpy as np

OUTPUT = Path(__file__).with_name("megatron_router_trace.jsonl")
EXPERTS, TOPK, LAYERS = 16, 2, (0, 1, 2, 3)


def routing_events(seed: int = 0) -> List[dict]:
    """The fixture's router calls, in order: {step, kind ('hook', 'mtp' or 'indices'), layers,
    ids int [len(layers), tokens, TOPK] (distinct expert ids per token, in score order)}."""
    rng = np.random.default_rng(seed)

    def draw(layers, tokens):
        return np.stack([[rng.permutation(EXPERTS)[:TOPK] for _ in range(tokens)]
                         for _ in layers]).astype(np.int64).reshape(len(layers), tokens, TOPK)

    return [
        {"step": 5, "kind": "hook", "layers": LAYERS, "ids": draw(LAYERS, 6)},
        {"step": 5, "kind": "mtp", "layers": (0,), "ids": draw((0,), 6)},
        {"step": 5, "kind": "hook", "layers": LAYERS, "ids": draw(LAYERS, 4)},
        {"step": 6, "kind": "hook", "layers": LAYERS, "ids": draw(LAYERS, 5)},
        {"step": 6, "kind": "hook", "layers": LAYERS[:3], "ids": draw(LAYERS[:3], 3)},
        {"step": 7, "kind": "indices", "layers": LAYERS, "ids": draw(LAYERS, 7)},
    ]


def expected_topk(events: List[dict]) -> np.ndarray:
    """int [L, T, k]: what an import must give: the tokens of the steps whose every event reaches
    all layers, in order; the hook path records each token's experts in ascending id order (it
    reads the boolean routing map)."""
    broken = {e["step"] for e in events if e["kind"] != "mtp" and tuple(e["layers"]) != LAYERS}
    parts = []
    for event in events:
        if event["kind"] == "mtp" or event["step"] in broken:
            continue
        ids = event["ids"]
        parts.append(np.sort(ids, axis=2) if event["kind"] == "hook" else ids)
    return np.concatenate(parts, axis=1)


def write_trace(out_dir: str, events: List[dict]) -> Path:
    """Feed ``events`` to Megatron's RouterTracer; returns the JSONL file it wrote."""
    import torch
    from megatron.core.transformer.moe.router_trace import RouterTracer

    tracer = RouterTracer(out_dir, max_steps=1000, rank=0, training_mode=True)
    router = SimpleNamespace(topk=TOPK)  # what the hook reads from a TopKRouter for a routing map
    capturing = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: False  # CPU-only torch cannot answer
    try:
        step = None
        for event in events:
            if step is not None and event["step"] != step:
                tracer.advance_step(step)
            step = event["step"]
            if event["kind"] == "indices":
                tracer.record_indices(torch.from_numpy(event["ids"]).permute(1, 0, 2).contiguous(),
                                      step=step, layer_ids=list(event["layers"]))
                continue
            for layer, ids in zip(event["layers"], event["ids"]):
                name = (f"mtp.layers.{layer}.mtp_model_layer.mlp.router" if event["kind"] == "mtp"
                        else f"decoder.layers.{layer}.mlp.router")
                tokens = ids.shape[0]
                routing_map = torch.zeros(tokens, EXPERTS, dtype=torch.bool)
                routing_map[torch.arange(tokens)[:, None], torch.from_numpy(ids)] = True
                probs = routing_map.float() / TOPK
                hidden = torch.zeros(tokens, 8)
                tracer.make_hook(name)(router, (hidden,), (probs, routing_map))
        tracer.advance_step(step)
        tracer.flush()
    finally:
        torch.cuda.is_current_stream_capturing = capturing
    return Path(tracer.output_path)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(write_trace(tmp, routing_events()), OUTPUT)
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
