"""The main job: train a recipe's model on local ranks in a folded layout.

The ranks run on the CPU with gloo, every one under the CPU runtime, or with one GPU per rank
and NCCL (``TrainOptions.device``, resolved by ``folding.run.device``); rank 0 shows a progress
bar and the loss at each logging interval; the parent collects a summary. Checkpoints use the
full layout (``folding.layout.checkpoint``), so ``--load`` works under any folding of the same model.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from folding.context_parallel.layout import check_sequence_length
from folding.errors import FoldingError
from folding.megatron.model import MoERouting
from folding.mesh import FoldingSpec
from folding.recipe import Recipe, load_recipe
from folding.run.device import DeviceChoice


@dataclass
class TrainOptions:
    """What ``folding train`` was asked to do."""

    recipe: str = "tiny-moe"
    steps: Optional[int] = None
    """Steps to run now; None means the recipe's train_iters (less any already done)."""
    nproc: Optional[int] = None
    """Local ranks; None means the recipe's world size."""
    folding: Dict[str, object] = field(default_factory=dict)
    """Degrees that replace the recipe's folding (tp, cp, ep, ..., and cp_comm_type)."""
    routing: Dict[str, object] = field(default_factory=dict)
    """MoERouting fields that replace the recipe's (dispatcher, capacity_factor, ...)."""
    save: Optional[str] = None
    load: Optional[str] = None
    placement: Optional[str] = None
    """Expert placement file for the folded dispatcher."""
    trace_out: Optional[str] = None
    """Write a routing trace (.npz) of the router's top-k choices to this file."""
    trace_tokens: int = 8192
    """Tokens per MoE layer in the trace."""
    log_interval: Optional[int] = None
    progress: bool = True
    device: str = "auto"
    """auto, cpu or cuda (``folding.run.device.resolve_device``)."""
    replace_interval: Optional[int] = None
    """Re-place the experts every this many steps (``folding.run.replacement``); None: never."""
    replace_max_moved: float = 0.1
    """Share of each layer's slots a re-placement may move."""
    replace_apply_after: Optional[int] = None
    """Switch exactly this many steps after a solve starts; None: at the first boundary after
    the solve is ready."""
    replace_time_limit: float = 10.0
    """Seconds a re-placement's solve may take."""
    replace_always: bool = False
    """Apply every solved placement that moves a slot, whatever it is predicted to save."""

    def check_replacement(self, recipe: Recipe) -> None:
        """Refuse re-placement settings that cannot work, with one line each."""
        if self.replace_interval is None:
            return
        if self.replace_interval < 1:
            raise FoldingError(f"--replace-interval must be a positive number of steps, not "
                               f"{self.replace_interval}")
        if not 0.0 <= self.replace_max_moved <= 1.0:
            raise FoldingError(f"--replace-max-moved is a share of the slots in [0, 1], not "
                               f"{self.replace_max_moved}")
        if self.replace_apply_after is not None and self.replace_apply_after < 1:
            raise FoldingError(f"--replace-apply-after must be a positive number of steps, not "
                               f"{self.replace_apply_after}")
        if not self.replace_time_limit > 0:
            raise FoldingError(f"--replace-time-limit must be positive, not {self.replace_time_limit}")
        routing = dataclasses.replace(MoERouting.from_training(recipe.training), **self.routing)
        if routing.dispatcher != "folded":
            raise FoldingError("--replace-interval needs the folded dispatcher (--dispatcher folded)")
        if recipe.training.precision != "fp32" or recipe.training.use_distributed_optimizer:
            raise FoldingError("--replace-interval moves Adam state of fp32 training with the "
                               "plain optimizer only")

    def load_placement(self, recipe: Recipe):
        """The placement, checked against the model and folding (None without one)."""
        if self.placement is None:
            return None
        from folding.megatron.model import check_placement
        from folding.placement.placement import Placement

        routing = dataclasses.replace(MoERouting.from_training(recipe.training), **self.routing)
        if routing.dispatcher != "folded":
            raise FoldingError("--placement needs the folded dispatcher (--dispatcher folded)")
        placement = Placement.load(self.placement)
        check_placement(placement, recipe.model, recipe.folding)
        return placement

    def resolve(self) -> Recipe:
        recipe = load_recipe(self.recipe)
        degrees = recipe.folding.degrees()
        overrides = dict(self.folding)
        if self.nproc is not None:
            overrides["world_size"] = self.nproc
        if overrides:
            # Derived degrees are derived again for the new layout.
            for derived in ("dp", "edp", "sequence_parallel"):
                degrees.pop(derived)
        degrees.update(overrides)
        spec = FoldingSpec(**degrees, num_experts=recipe.model.num_experts,
                           num_layers=recipe.model.num_layers,
                           num_attention_heads=recipe.model.num_attention_heads,
                           num_query_groups=recipe.model.query_groups)
        training = recipe.training
        # Each sequence is cut into 2 x CP chunks (and over TP with sequence parallel).
        check_sequence_length(training.seq_length, spec)
        if self.log_interval:
            training = dataclasses.replace(training, log_interval=self.log_interval)
        if spec.world_size > 64:
            raise FoldingError(f"folding train runs local ranks; {spec.world_size} is too many")
        micro = training.micro_batch_size * spec.dp
        if training.global_batch_size % micro:
            raise FoldingError(f"global batch {training.global_batch_size} is not divisible by "
                               f"micro-batch size {training.micro_batch_size} x DP {spec.dp}")
        return dataclasses.replace(recipe, folding=spec, training=training)


@dataclass
class TrainSummary:
    recipe: str
    folding: str
    """The layout in one line (``FoldingSpec.describe``)."""
    world_size: int
    gpus_per_node: int
    first_step: int
    losses: List[float]
    wall_s: float
    train_s: float
    tokens_per_s: float
    saved: Optional[str] = None
    trace: Optional[str] = None
    traced_tokens: Optional[int] = None
    traffic: Optional[list] = None
    degrees: Dict[str, object] = field(default_factory=dict)
    """The resolved folding (``FoldingSpec.degrees``: tp, cp, ..., cp_comm_type)."""
    device: Optional[DeviceChoice] = None
    """Where the ranks ran, and why."""
    replacements: Optional[list] = None
    """One entry per re-placement attempt (``folding.placement.live.Attempt.to_json``)."""
    placement: Optional[dict] = None
    """The expert placement at the end, with the folded dispatcher."""

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        """Mean of the last ten steps: a single step's loss is noisy."""
        tail = self.losses[-10:]
        return sum(tail) / len(tail)

    def to_json(self) -> dict:
        return {"recipe": self.recipe, "folding": self.folding, "degrees": self.degrees,
                "world_size": self.world_size, "first_step": self.first_step,
                "steps": len(self.losses), "first_loss": self.first_loss,
                "last_loss": self.last_loss, "losses": self.losses, "wall_s": self.wall_s,
                "train_s": self.train_s, "tokens_per_s": self.tokens_per_s,
                "saved": self.saved, "trace": self.trace, "traced_tokens": self.traced_tokens,
                "device": self.device.to_json() if self.device else None,
                "traffic": self.traffic, "replacements": self.replacements,
                "placement": self.placement}


def _train_rank(rank: int, world: int, options: TrainOptions, recipe: Recipe) -> Optional[dict]:
    from tqdm import tqdm

    from folding.layout import checkpoint
    from folding.megatron.cpu_runtime import enable
    from folding.run.corpus import ByteCorpus, micro_batches
    from folding.run.device import synchronize
    from folding.run.rank_trainer import RankTrainer

    enable()
    spec, training = recipe.folding, recipe.training
    routing = dataclasses.replace(MoERouting.from_training(training), **options.routing)
    loaded = checkpoint.read(options.load, recipe.model) if options.load else None
    placement = options.load_placement(recipe)
    if placement is None and loaded and routing.dispatcher == "folded":
        placement = saved_placement(loaded["meta"], recipe)
    trainer = RankTrainer(recipe.model, training, spec, routing,
                          full_weights=loaded["model"] if loaded else None,
                          placement=placement)
    if loaded:
        checkpoint.restore(trainer, loaded)
    replacer = None
    if options.replace_interval is not None:
        from folding.run.replacement import Replacer

        replacer = Replacer(trainer, options.replace_interval, options.replace_max_moved,
                            options.replace_apply_after, options.replace_time_limit,
                            options.replace_always)
        if loaded:
            replacer.resume(loaded["meta"])
    tracer = None
    if options.trace_out:
        from folding.megatron.router_trace import RouterTraceHook

        tracer = RouterTraceHook(trainer, options.trace_tokens)
    corpus = ByteCorpus(training.data or "folding/data/corpus.txt")
    first = trainer.steps_done
    steps = options.steps if options.steps is not None else max(training.train_iters - first, 0)
    # The CP (and TP) ranks of a DP rank get the same whole sequences; RankTrainer.step cuts
    # each CP rank's chunks out of them itself.
    dp_rank = spec.coordinates(rank)["attention"]["dp"]
    per_rank = training.global_batch_size // (training.micro_batch_size * spec.dp)
    # Every token of the global batch once, however many CP ranks share its sequence.
    tokens_per_step = training.global_batch_size * training.seq_length
    show = rank == 0 and options.progress
    bar = tqdm(total=steps, desc=f"train {recipe.name}", unit="step", disable=not show,
               file=sys.stderr, dynamic_ncols=True)
    losses: List[float] = []
    shown: list = []
    device = trainer.device
    synchronize(device)
    started = time.perf_counter()
    for step in range(first, first + steps):
        batch = corpus.global_batch(training.seed, step, training.global_batch_size,
                                    training.seq_length, device=device)
        result = trainer.step(micro_batches(batch, dp_rank, spec.dp, per_rank,
                                            training.micro_batch_size))
        losses.append(result.loss)
        if replacer is not None:
            replacer.after_step()
            if show:
                for attempt in replacer.attempts[len(shown):]:
                    bar.write(attempt.line(), file=sys.stderr)
                shown = list(replacer.attempts)
        bar.update()
        bar.set_postfix(loss=f"{result.loss:.3f}")
        done = step + 1 - first
        if show and (done % training.log_interval == 0 or done == steps):
            elapsed = time.perf_counter() - started
            window = losses[-training.log_interval:]
            bar.write(f"step {step + 1:5d} | loss {sum(window) / len(window):.4f} | "
                      f"lr {trainer.scheduler.get_lr(trainer.optimizer.param_groups[0]):.2e} | "
                      f"grad norm {result.grad_norm:.3f} | "
                      f"{done * tokens_per_step / elapsed:,.0f} tokens/s", file=sys.stderr)
    bar.close()
    synchronize(device)
    train_s = time.perf_counter() - started
    traced = tracer.write(options.trace_out) if tracer else None
    if replacer is not None:
        replacer.finish()
    if options.save:
        meta = {"recipe": recipe.name, "folding": spec.degrees(),
                "losses": (loaded["meta"].get("losses", []) if loaded else []) + losses}
        if trainer.placement is not None:
            meta["placement"] = trainer.placement.to_json()
        if replacer is not None:
            meta.update(replacer.checkpoint_meta())
        checkpoint.save(options.save, trainer, meta)
    traffic = trainer.traffic_report()
    if rank != 0:
        return None
    return {"losses": losses, "first_step": first, "train_s": train_s, "traced_tokens": traced,
            "tokens_per_s": steps * tokens_per_step / train_s if steps else 0.0,
            "traffic": traffic,
            "replacements": ([a.to_json() for a in replacer.attempts] if replacer else None),
            "placement": trainer.placement.to_json() if trainer.placement is not None else None}


def saved_placement(meta: dict, recipe: Recipe):
    """The placement a checkpoint was saved under, when it fits this folding (else None: the
    checkpoint's full layout loads under any placement, the default one included)."""
    if "placement" not in meta:
        return None
    from folding.megatron.model import check_placement
    from folding.placement.placement import Placement

    try:
        placement = Placement.from_json(meta["placement"], source="checkpoint placement")
        check_placement(placement, recipe.model, recipe.folding)
    except FoldingError:
        return None
    if placement.gpus_per_node != recipe.folding.gpus_per_node:
        return None
    return placement


def train(options: TrainOptions, timeout_s: Optional[float] = None) -> TrainSummary:
    from folding.run.device import pick_device
    from folding.run.launch import run_ranks

    recipe = options.resolve()
    device = pick_device(options.device, recipe.folding.world_size)
    options.load_placement(recipe)  # a bad placement is refused before any rank starts
    options.check_replacement(recipe)
    if options.trace_out is not None and options.trace_tokens < 1:
        raise FoldingError(f"--trace-tokens must be positive, not {options.trace_tokens}")
    if options.load:
        from folding.layout.checkpoint import saved_step

        if saved_step(options.load) is None:
            raise FoldingError(f"{options.load} is not a checkpoint: meta.json is missing")
    started = time.perf_counter()
    results = run_ranks(_train_rank, recipe.folding.world_size, options, recipe,
                        timeout_s=timeout_s, device=device)
    head = results[0]
    if not head["losses"]:
        raise FoldingError("nothing to train: the recipe's train_iters are done; pass --steps")
    return TrainSummary(recipe=recipe.name, folding=recipe.folding.describe(),
                        world_size=recipe.folding.world_size,
                        gpus_per_node=recipe.folding.gpus_per_node, first_step=head["first_step"],
                        losses=head["losses"], wall_s=time.perf_counter() - started,
                        train_s=head["train_s"], tokens_per_s=head["tokens_per_s"],
                        saved=options.save, trace=options.trace_out,
                        traced_tokens=head["traced_tokens"], traffic=head["traffic"],
                        degrees=recipe.folding.degrees(), device=device,
                        replacements=head["replacements"], placement=head["placement"])
