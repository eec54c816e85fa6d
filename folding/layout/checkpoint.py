"""Checkpoints in the full (unsharded) layout, so a run can resume under any folding.

A checkpoint directory holds ``model.pt`` (every parameter of the full model), ``optimizer.pt``
(Adam's first and second moments of every full parameter, and its step count) and
``meta.json`` (recipe, folding, step, learning-rate scheduler, losses so far). Saving gathers
every rank's shards and rebuilds full tensors through ``folding.layout.weights``; loading slices them
again for the new folding. Files are written to a temporary name and renamed, so an interrupted
save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from folding.errors import FoldingError
from folding.layout.parameters import full_parameters
from folding.recipe import ModelArch

FILES = ("model.pt", "optimizer.pt", "meta.json")


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save(directory: str, trainer, meta: Dict) -> None:
    """Collective: every rank calls it; rank 0 writes the files."""
    import torch.distributed as dist

    state = trainer.full_state()
    if dist.get_rank() == 0:
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        _atomic_write(out / "model.pt", lambda p: torch.save(state["model"], p))
        _atomic_write(out / "optimizer.pt", lambda p: torch.save(state["optimizer"], p))
        meta = dict(meta, scheduler=state["scheduler"], step=state["step"])
        _atomic_write(out / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=1)))
    dist.barrier()


def read(directory: str, arch: ModelArch) -> Dict:
    """The checkpoint's full tensors and metadata, checked against the model they are for."""
    path = Path(directory)
    missing = [f for f in FILES if not (path / f).exists()]
    if missing:
        raise FoldingError(f"{directory} is not a checkpoint: {missing[0]} is missing")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except json.JSONDecodeError as e:
        raise FoldingError(f"{path / 'meta.json'} is not valid JSON ({e.msg})") from None
    model = torch.load(path / "model.pt", weights_only=True)
    optimizer = torch.load(path / "optimizer.pt", weights_only=True)
    expected = full_parameters(arch)
    for name, shape in expected.items():
        if name not in model:
            raise FoldingError(f"checkpoint {directory} lacks {name}: saved for another model?")
        if tuple(model[name].shape) != shape:
            raise FoldingError(f"checkpoint {directory}: {name} has shape "
                               f"{tuple(model[name].shape)}, the recipe's model needs {shape}")
    extra = sorted(set(model) - set(expected))
    if extra:
        raise FoldingError(f"checkpoint {directory} has {extra[0]}, which the recipe's model lacks")
    return {"model": model, "optimizer": optimizer, "meta": meta}


def restore(trainer, checkpoint: Dict) -> None:
    """Load optimizer moments, step counts and scheduler into a trainer built from the model."""
    trainer.restore({"optimizer": checkpoint["optimizer"], "scheduler": checkpoint["meta"]["scheduler"],
                     "step": checkpoint["meta"]["step"]})


def saved_step(directory: str) -> Optional[int]:
    path = Path(directory) / "meta.json"
    if not path.exists():
        return None
    return int(json.loads(path.read_text())["step"])
