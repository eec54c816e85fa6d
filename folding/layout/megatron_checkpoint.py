"""Megatron-LM's torch_dist checkpoint directory, to and from the plugin's full checkpoint.

A torch_dist directory is laid out as Megatron-LM's training loop writes it:
``latest_checkpointed_iteration.txt`` holds the iteration and ``iter_NNNNNNN/`` the files of
Megatron-Core's ``dist_checkpointing``. Its common state carries what
``megatron.training.checkpointing.load_checkpoint`` reads: ``args`` (the model's sizes, the
parallel degrees, the samples consumed), ``checkpoint_version`` 3.0 and ``iteration``.

Megatron does the work: one process (world size 1, gloo, the CPU runtime) builds the recipe's
GPTModel with Megatron's own MoE layer, and Megatron's ``sharded_state_dict`` with
``dist_checkpointing.save`` and ``load`` move the weights. In one process every expert has the
slot of its own id, so the expert names are the logical ids that folded layers write
(``folding.dispatcher.expert_checkpoint``): the directory loads under any folding and placement.

Megatron-LM gets the model and the iteration, not the optimizer: Megatron's optimizer state
follows the optimizer layout of the run that writes it (its chained and distributed
optimizers), which one process cannot reproduce for another folding. Resume Megatron-LM with
``--no-load-optim --no-load-rng``. The full checkpoint's Adam moments and metadata travel under
``folding.*`` keys that Megatron-LM never reads, so torch_dist -> full gives the full checkpoint
back bit for bit; from a directory Megatron-LM wrote, the full checkpoint gets the model, the
iteration, the learning-rate schedule at that iteration and a fresh optimizer.

Everything is written to a temporary sibling of the destination and renamed into place at the
end: a conversion that fails leaves nothing at the destination.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import torch

from folding.errors import FoldingError
from folding.layout import checkpoint
from folding.recipe import Recipe, load_recipe

FORMATS = ("full", "torch_dist")
TRACKER = "latest_checkpointed_iteration.txt"
# Common-state entry and sharded-tensor key prefix of what only folding reads back.
FOLDING_ENTRY = "folding"
MOMENTS_PREFIX = "folding.optimizer."
MOMENT_FIELDS = ("exp_avg", "exp_avg_sq")
# What Megatron-LM's save passes as content metadata (without the optimizer's sharding type:
# no optimizer state is written), so its load builds the model's sharded state dict the same way.
CONTENT_METADATA = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}


@dataclass
class ConvertSummary:
    source: str
    destination: str
    source_format: str
    target_format: str
    recipe: str
    iteration: int
    model_tensors: int
    adam_moments: bool
    """Whether Adam's moments were carried (torch_dist -> full: found under folding.*)."""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- formats and paths
def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def source_format(path: str) -> str:
    """``full`` or ``torch_dist``, from the files in ``path``; FoldingError when neither."""
    root = Path(path)
    if not root.is_dir():
        raise FoldingError(f"{path} is not a directory")
    if any((root / f).exists() for f in checkpoint.FILES):
        return "full"
    if (root / TRACKER).exists() or (root / "metadata.json").exists():
        return "torch_dist"
    raise FoldingError(f"{path} is not a checkpoint: no meta.json (full) and no {TRACKER} "
                       f"(torch_dist)")


def _torch_dist_directory(path: str) -> Tuple[Path, int]:
    """(directory of dist_checkpointing files, iteration) of a torch_dist source: the top
    directory with its tracker file, or an ``iter_NNNNNNN`` directory itself."""
    from megatron.core import dist_checkpointing

    root = Path(path)
    if (root / TRACKER).exists():
        text = (root / TRACKER).read_text().strip()
        if text == "release":
            directory, iteration = root / "release", 0
        else:
            try:
                iteration = int(text)
            except ValueError:
                raise FoldingError(f"{root / TRACKER} holds {text!r}, not an iteration") from None
            directory = root / iteration_dirname(iteration)
    else:
        directory, iteration = root, None
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FoldingError(f"{directory} is not a torch_dist checkpoint: metadata.json is missing")
    if iteration is None:
        common = dist_checkpointing.load_common_state_dict(str(directory))
        iteration = int(common.get("iteration", 0))
    return directory, iteration


@contextlib.contextmanager
def _new_directory(destination: str) -> Iterator[Path]:
    """A temporary sibling of ``destination``, renamed to it when the block succeeds and
    removed when it fails."""
    target = Path(destination)
    if target.exists():
        raise FoldingError(f"{destination} exists: convert writes a new directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- one Megatron process
@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """torch.distributed with one gloo rank (an in-process store: no port), and Megatron on the
    CPU runtime, for the length of the block."""
    import torch.distributed as dist

    from folding.megatron import cpu_runtime
    from folding.megatron.groups import destroy

    if dist.is_initialized():
        raise FoldingError("checkpoint conversion runs in a process of its own, and this one "
                           "already has a torch.distributed process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    started = cpu_runtime.enable()
    try:
        yield
    finally:
        destroy()
        if started:
            cpu_runtime.disable()
        dist.destroy_process_group()


def _one_process_recipe(recipe: Recipe) -> Recipe:
    """The recipe's model in one process, fp32 (the full layout's precision), Megatron's own
    dispatcher and a plain optimizer."""
    spec = dataclasses.replace(recipe.folding, world_size=1, tp=1, cp=1, dp=None, pp=1, vpp=None,
                               etp=None, ep=1, edp=None, gpus_per_node=1, sequence_parallel=None)
    training = dataclasses.replace(recipe.training, precision="fp32",
                                   use_distributed_optimizer=False)
    return dataclasses.replace(recipe, folding=spec, training=training)


def _trainer(recipe: Recipe, full_weights=None):
    from folding.megatron.model import MoERouting
    from folding.run.rank_trainer import RankTrainer

    routing = dataclasses.replace(MoERouting.from_training(recipe.training), dispatcher="alltoall")
    return RankTrainer(recipe.model, recipe.training, recipe.folding, routing,
                       full_weights=full_weights)


def _megatron_args(recipe: Recipe, iteration: int) -> argparse.Namespace:
    """The ``args`` Megatron-LM's load_checkpoint reads from a checkpoint: model sizes it
    compares with its own, the degrees it checks resharding against, the samples consumed, and
    the flags saying that no optimizer or RNG state was saved."""
    arch, training = recipe.model, recipe.training
    return argparse.Namespace(
        num_layers=arch.num_layers, hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        max_position_embeddings=arch.max_position_embeddings or training.seq_length,
        make_vocab_size_divisible_by=arch.make_vocab_size_divisible_by,
        num_experts=arch.num_experts, data_parallel_random_init=False,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=1, world_size=1, data_parallel_size=1,
        global_batch_size=training.global_batch_size,
        consumed_train_samples=iteration * training.global_batch_size,
        skipped_train_samples=0, consumed_valid_samples=0,
        ckpt_format="torch_dist", use_dist_ckpt=True, no_save_optim=True, no_save_rng=True)


def _require_psutil() -> None:
    # Megatron-Core's torch_dist writer measures memory with psutil in its writer processes;
    # without it those processes die and the save waits for them forever.
    if importlib.util.find_spec("psutil") is None:
        raise FoldingError("writing a torch_dist checkpoint needs psutil (megatron-core's writer "
                           "uses it): pip install psutil")


def _read_full_meta(src: str) -> Dict:
    path = Path(src) / "meta.json"
    if not path.exists():
        raise FoldingError(f"{src} is not a checkpoint: meta.json is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FoldingError(f"{path} is not valid JSON ({e.msg})") from None


# --------------------------------------------------------------------------- full -> torch_dist
def _moment_tensors(optimizer: Dict) -> Dict:
    from megatron.core.dist_checkpointing import ShardedTensor

    return {f"{field}.{name}": ShardedTensor.from_rank_offsets(
                f"{MOMENTS_PREFIX}{field}.{name}", tensor.contiguous(), replica_id=0)
            for field in MOMENT_FIELDS for name, tensor in optimizer.get(field, {}).items()}


def full_to_torch_dist(src: str, dst: str, recipe_name: Optional[str] = None) -> ConvertSummary:
    from megatron.core import dist_checkpointing

    meta = _read_full_meta(src)
    if not (recipe_name or meta.get("recipe")):
        raise FoldingError(f"{src}/meta.json does not name its recipe: pass --recipe")
    recipe = load_recipe(recipe_name or meta["recipe"])
    saved = checkpoint.read(src, recipe.model)
    step = int(meta.get("step", 0))
    _require_psutil()
    one = _one_process_recipe(recipe)
    with _new_directory(dst) as out, _single_process():
        trainer = _trainer(one, full_weights=saved["model"])
        try:
            state = {
                "model": trainer.chunks[0].sharded_state_dict(metadata=dict(CONTENT_METADATA)),
                "args": _megatron_args(recipe, step),
                "checkpoint_version": 3.0,
                "iteration": step,
                "num_floating_point_operations_so_far": 0,
                FOLDING_ENTRY: {"meta": meta, "adam_step": int(saved["optimizer"].get("step", 0))},
                "folding_moments": _moment_tensors(saved["optimizer"]),
            }
            directory = out / iteration_dirname(step)
            directory.mkdir()
            dist_checkpointing.save(state, str(directory), content_metadata=CONTENT_METADATA)
        finally:
            trainer.close()
        # Written last, as Megatron-LM does: the tracker names a complete iteration.
        (out / TRACKER).write_text(str(step))
    moments = bool(saved["optimizer"].get("exp_avg"))
    return ConvertSummary(src, dst, "full", "torch_dist", recipe.name, step, len(saved["model"]),
                          moments)


# --------------------------------------------------------------------------- torch_dist -> full
def _check_against_model(directory: Path, model_state: Dict, src: str) -> Dict:
    """The checkpoint's tensor metadata, after checking that it holds every tensor of the model
    with the model's global shape (FoldingError naming the first that does not)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    available = dist_checkpointing.load_tensors_metadata(str(directory))
    built = dict(model_state)
    apply_factories(built)  # SwiGLU's fc1 is saved as two tensors; check those
    for sharded in nested_values(built):
        if not isinstance(sharded, ShardedTensor):
            continue
        if sharded.key not in available:
            raise FoldingError(f"{src} lacks {sharded.key}: saved for another model? (recipe "
                               f"mismatch)")
        shape, needed = tuple(available[sharded.key].global_shape), tuple(sharded.global_shape)
        # Megatron-LM pads the vocabulary (to a multiple of make_vocab_size_divisible_by x TP)
        # and marks those tensors: more rows than the recipe's vocabulary are padding, which
        # Megatron's load leaves out.
        padded = (getattr(sharded, "allow_shape_mismatch", False) and len(shape) == len(needed)
                  and shape[0] >= needed[0] and shape[1:] == needed[1:])
        if shape != needed and not padded:
            raise FoldingError(f"{src}: {sharded.key} has shape {shape}, the recipe's model "
                               f"needs {needed}")
    return available


def torch_dist_to_full(src: str, dst: str, recipe_name: Optional[str] = None) -> ConvertSummary:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from folding.layout.weights import unshard

    directory, iteration = _torch_dist_directory(src)
    common = dist_checkpointing.load_common_state_dict(str(directory))
    carried = common.get(FOLDING_ENTRY) or {}
    name = recipe_name or carried.get("meta", {}).get("recipe")
    if not name:
        raise FoldingError(f"{src} was not written by folding, so it does not name its recipe: "
                           f"pass --recipe")
    recipe = load_recipe(name)
    one = _one_process_recipe(recipe)
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    with _new_directory(dst) as out, _single_process():
        trainer = _trainer(one)
        try:
            model_state = trainer.chunks[0].sharded_state_dict(metadata=dict(content))
            available = _check_against_model(directory, model_state, src)
            moments = {key[len(MOMENTS_PREFIX):]: ShardedTensor.from_rank_offsets(
                           key, torch.empty(meta.global_shape, dtype=meta.dtype), replica_id=0)
                       for key, meta in available.items() if key.startswith(MOMENTS_PREFIX)}
            loaded = dist_checkpointing.load({"model": model_state, "moments": moments},
                                             str(directory))
            trainer.chunks[0].load_state_dict(loaded["model"])
            model = unshard([trainer.param_shard()], one.model, one.folding)
            if carried:
                meta = carried["meta"]
                optimizer = {field: {} for field in MOMENT_FIELDS}
                for key, tensor in loaded["moments"].items():
                    field, param = key.split(".", 1)
                    optimizer[field][param] = tensor
                optimizer["step"] = int(carried.get("adam_step", 0))
            else:
                # Megatron-LM's own checkpoint: the schedule a folding run has at this iteration,
                # and a fresh optimizer (Adam step 0 restores nothing).
                trainer.scheduler.step(increment=iteration)
                meta = {"recipe": recipe.name, "folding": one.folding.degrees(), "losses": [],
                        "scheduler": trainer.scheduler.state_dict(), "step": iteration}
                optimizer = {field: {} for field in MOMENT_FIELDS}
                optimizer["step"] = 0
        finally:
            trainer.close()
        torch.save(model, out / "model.pt")
        torch.save(optimizer, out / "optimizer.pt")
        (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return ConvertSummary(src, dst, "torch_dist", "full", recipe.name, iteration, len(model),
                          bool(carried) and bool(optimizer["exp_avg"]))


# --------------------------------------------------------------------------- entry point
def convert(src: str, dst: str, to: Optional[str] = None,
            recipe_name: Optional[str] = None) -> ConvertSummary:
    """Convert checkpoint ``src`` into a new directory ``dst`` in format ``to`` (default: the
    other one)."""
    if to is not None and to not in FORMATS:
        raise FoldingError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    have = source_format(src)
    to = to or ("torch_dist" if have == "full" else "full")
    if to == have:
        raise FoldingError(f"{src} is already a {have} checkpoint")
    if Path(dst).exists():
        raise FoldingError(f"{dst} exists: convert writes a new directory")
    with _quiet():
        if have == "full":
            return full_to_torch_dist(src, dst, recipe_name)
        return torch_dist_to_full(src, dst, recipe_name)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Megatron and torch.distributed warn about missing GPU libraries and deprecated names,
    and Megatron logs every step of a save: on a CPU conversion that is noise, not news."""
    import logging
    import warnings

    logger = logging.getLogger("megatron")
    level = logger.level
    with warnings.catch_warnings():
        for module in ("megatron", "torch.distributed", "torch.nn", "transformer_engine",
                       "folding.megatron.cpu_runtime"):
            warnings.filterwarnings("ignore", module=module)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            logger.setLevel(level)
