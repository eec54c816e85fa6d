"""Re-placement inside Megatron-LM's own training loop: ``--folding-replace-interval N``.

The pieces are ``folding train``'s (``folding.run.replacement``): ``LiveStatistics`` sums the
router's choices on the device, ``Replacer`` reduces them every N steps, solves on rank 0 in a
thread (``folding.placement.live.decide``: within a move budget, skipped when the predicted
saving does not cover the bytes moved) and broadcasts the verdict at the first step boundary
after the solve is ready. This module gives it what it drives, ``MegatronTrainer``: Megatron's
model chunks and optimizer as they are inside ``megatron.training.training.train``, and
``move_experts`` for them.

``install`` wraps ``megatron.training.training.train_step``: the first call builds the
``Replacer`` (so the first step's routing is counted), every call is followed by its
``after_step`` at the step boundary. Megatron's ``save_checkpoint`` is followed by a small JSON
next to the checkpoint (the current placement and the window's statistics), and
``load_checkpoint`` is preceded by reading it back: the layers take the saved placement before
Megatron loads, and since experts are named by what they are in torch_dist checkpoints
(``folding.dispatcher.expert_checkpoint``), each slot loads the expert the placement gives it.
When Megatron's ``checkpoint_and_decide_exit`` stops the loop early (a signal, its time limit),
a solve still in flight is judged and reported first.

Moving experts (``MegatronTrainer.move_experts``): for every slot whose expert changes, the
source slot's parameters, its fp32 main parameters (when the model's are 16-bit) and Adam's
two moments go to the destination over one all-to-all of the EP group, as
``RankTrainer.move_experts`` does. Megatron's distributed optimizer keeps the main parameters
and moments as shards over the expert-data-parallel group, cut at buffer offsets that differ
from slot to slot, so each source's state is first made whole over that group (each rank adds
its shard into zeros: one all-reduce, exact), and each destination keeps the part its own
shard covers. Parameters are written into ``.data`` in place: they are views of Megatron's
DDP buffers, and with fp32 parameters the distributed optimizer's main shards are views of
them too.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Tuple

import torch

from folding.errors import FoldingError

STATE_FILE = "folding_replacement.json"
"""Written next to each checkpoint Megatron saves: placement and routing statistics."""

MOMENTS = ("exp_avg", "exp_avg_sq")


# --------------------------------------------------------------------------- arguments
def add_arguments(group) -> None:
    group.add_argument("--folding-replace-interval", metavar="N", type=int, default=None,
                       help="with --folding-dispatcher: every N steps, re-place the experts from "
                            "live routing statistics (solved off the critical path) and move "
                            "the experts that change slots between two steps: parameters, main "
                            "parameters and Adam moments, exactly")
    group.add_argument("--folding-replace-max-moved", metavar="SHARE", type=float, default=0.1,
                       help="share of each layer's slots one re-placement may move (default 0.1)")
    group.add_argument("--folding-replace-apply-after", metavar="STEPS", type=int, default=None,
                       help="switch exactly STEPS steps after the solve starts, waiting for it "
                            "if needed (repeatable runs; default: the first step boundary after "
                            "it is ready)")
    group.add_argument("--folding-replace-time-limit", metavar="SECONDS", type=float,
                       default=10.0, help="time limit of each re-placement's solve (default 10)")
    group.add_argument("--folding-replace-always", action="store_true",
                       help="apply every re-placement that moves a slot, whatever it is "
                            "predicted to save (to check that the switch is exact)")


def enabled(args) -> bool:
    return getattr(args, "folding_replace_interval", None) is not None


def check_arguments(args) -> None:
    """Refuse a re-placement setting the loop cannot run (FoldingError, one line)."""
    if not enabled(args):
        return
    interval = args.folding_replace_interval
    if interval < 1:
        raise FoldingError(f"--folding-replace-interval must be a positive number of steps, "
                           f"not {interval}")
    share = args.folding_replace_max_moved
    if not 0.0 <= share <= 1.0:
        raise FoldingError(f"--folding-replace-max-moved is a share of the slots in [0, 1], "
                           f"not {share}")
    after = args.folding_replace_apply_after
    if after is not None and after < 1:
        raise FoldingError(f"--folding-replace-apply-after must be a positive number of steps, "
                           f"not {after}")
    if not args.folding_replace_time_limit > 0:
        raise FoldingError(f"--folding-replace-time-limit must be positive, not "
                           f"{args.folding_replace_time_limit}")
    if not getattr(args, "folding_dispatcher", False):
        raise FoldingError("--folding-replace-interval needs --folding-dispatcher: Megatron's "
                           "own dispatcher always uses its contiguous expert layout")
    if (getattr(args, "bf16", False) or getattr(args, "fp16", False)) and \
            not getattr(args, "use_distributed_optimizer", False):
        raise FoldingError("--folding-replace-interval with --bf16/--fp16 needs "
                           "--use-distributed-optimizer (the main parameters of Megatron's "
                           "other 16-bit optimizer are not moved)")
    if getattr(args, "fp16", False):
        raise FoldingError("--folding-replace-interval does not work with --fp16 yet (moving "
                           "experts under a dynamic loss scale is not checked); use --bf16")
    if getattr(args, "optimizer", "adam") != "adam":
        raise FoldingError(f"--folding-replace-interval moves Adam's moments; --optimizer "
                           f"{args.optimizer} is not supported")
    if getattr(args, "overlap_param_gather", False):
        raise FoldingError("--folding-replace-interval does not work with "
                           "--overlap-param-gather: parameters would be gathered into the "
                           "slots after they moved")
    from folding.megatron.mapping import refuse_checkpoints_by_position

    refuse_checkpoints_by_position(args, "--folding-replace-interval")


# --------------------------------------------------------------------------- the trainer
def _unwrapped(model) -> List[torch.nn.Module]:
    chunks = []
    for chunk in model:
        while hasattr(chunk, "module"):
            chunk = chunk.module
        chunks.append(chunk)
    return chunks


def _say(line: str) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)


class MegatronTrainer:
    """What ``folding.run.replacement.Replacer`` drives, over Megatron's model and optimizer."""

    def __init__(self, args, model, optimizer):
        from folding.dispatcher.moe_layer import folded_moe_layers
        from folding.megatron.mapping import model_from_args, spec_from_args

        self.args = args
        self.chunks = _unwrapped(model)
        self.optimizer = optimizer
        self.arch = model_from_args(args)
        self.spec = spec_from_args(args)
        self.layers = folded_moe_layers(self.chunks)
        # Where the model is (under the CPU runtime CUDA may look available).
        self.device = next(self.chunks[0].parameters()).device
        if not self.layers:
            raise FoldingError("--folding-replace-interval needs a MoE layer on every pipeline "
                               "stage (this rank's model chunks have none)")
        precision = "bf16" if getattr(args, "bf16", False) else "fp32"
        self.training = type("Training", (), {"precision": precision})()
        self.placement = self._current_placement()
        self.steps_done = 0

    def _current_placement(self):
        """The placement every layer was built with (the same object on every layer)."""
        return _placement_of(self.layers[0], self.arch, self.spec)

    def set_placement(self, placement) -> None:
        """The layers dispatch by ``placement`` and name their slots after it; nothing moves."""
        for layer in self.layers:
            layer.set_placement(placement)
        self.placement = placement

    # ----------------------------------------------------------------- optimizer state
    def _optimizers(self):
        return getattr(self.optimizer, "chained_optimizers", [self.optimizer])

    def _expert_optimizer(self):
        """The optimizer of the experts' parameters, and whether it is Megatron's distributed
        one."""
        expert = list(self.layers[0].experts.local_experts[0].parameters())[0]
        for opt in self._optimizers():
            if hasattr(opt, "model_param_gbuf_map"):
                if any(p in opt.model_param_gbuf_map for layer in self.layers
                       for p in layer.experts.parameters()):
                    return opt, True
            elif type(opt).__name__ == "FP32Optimizer":
                if any(p is expert for g in opt.optimizer.param_groups for p in g["params"]):
                    return opt, False
        if getattr(self.args, "use_distributed_optimizer", False):
            return None, True  # this rank's shard holds no expert element at all
        raise FoldingError("--folding-replace-interval: the experts' optimizer is neither "
                           "Megatron's distributed optimizer nor its fp32 one")

    def _state_keys(self, param) -> Tuple[str, ...]:
        """The per-element state moved with a parameter, beyond the parameter itself."""
        return (("param",) if param.dtype != torch.float32 else ()) + MOMENTS

    def _shard(self, opt, distributed: bool, param) -> Tuple[int, int, Dict[str, torch.Tensor]]:
        """(start, end, tensors): the part of ``param`` (flat) whose main parameter and
        moments this rank holds, and those tensors (each end - start long)."""
        if opt is None:
            return 0, 0, {}
        if not distributed:
            state = opt.optimizer.state[param]
            return 0, param.numel(), {k: state[k] for k in MOMENTS}
        if param not in getattr(opt, "model_param_group_index_map", {}):
            return 0, 0, {}
        tensors = opt._get_main_param_and_optimizer_states(param)
        span = opt._get_model_param_range_map(param)["param"]
        missing = [k for k in self._state_keys(param) if k not in tensors]
        if missing:
            raise FoldingError(f"--folding-replace-interval: the optimizer holds no {missing[0]} "
                               f"for an expert parameter (no step taken yet?)")
        return span.start, span.end, tensors

    # ----------------------------------------------------------------- moving
    def _whole(self, layer, slot: int, opt, distributed: bool, first: bool) -> torch.Tensor:
        """One slot's parameters then, per parameter, its state made whole over this rank's
        shard (zeros elsewhere), as one fp32 vector. ``first``: this rank is the first of its
        optimizer's data-parallel group, the one that contributes the parameters themselves."""
        out = []
        for p in layer.experts.local_experts[slot].parameters():
            n = p.numel()
            out.append(p.data.reshape(-1).float() if first else torch.zeros(n, device=p.device))
            start, end, tensors = self._shard(opt, distributed, p)
            for key in self._state_keys(p):
                whole = torch.zeros(n, dtype=torch.float32, device=p.device)
                if end > start:
                    whole[start:end] = tensors[key].reshape(-1).float()
                out.append(whole)
        return torch.cat(out)

    def _write(self, layer, slot: int, flat: torch.Tensor, opt, distributed: bool) -> None:
        offset = 0
        for p in layer.experts.local_experts[slot].parameters():
            n = p.numel()
            p.data.copy_(flat[offset:offset + n].view_as(p.data))
            offset += n
            start, end, tensors = self._shard(opt, distributed, p)
            for key in self._state_keys(p):
                if end > start:
                    target = tensors[key]
                    target.copy_(flat[offset + start:offset + end].view_as(target))
                offset += n

    def move_experts(self, placement) -> int:
        """Switch to ``placement`` between two steps (a collective over each EP group and each
        expert-data-parallel group): every slot whose expert changes receives that expert's
        parameters, main parameters and Adam moments from a slot holding it now. Returns the
        slots this rank received."""
        import torch.distributed as dist

        from folding.run.replacement import exchange_slots, transfer_plans

        opt, distributed = self._expert_optimizer()
        if opt is None:
            from megatron.core import parallel_state

            dp_group = parallel_state.get_expert_data_parallel_group(
                partial_expert_data_parallel=True)
        else:
            dp_group = opt.data_parallel_group if distributed else None
        dp_size = dist.get_world_size(dp_group) if distributed else 1
        first = not distributed or dist.get_rank(dp_group) == 0
        group = self.layers[0].ep_group
        me = dist.get_rank(group)
        S = self.layers[0].slots_per_rank
        # Sources on this rank (each made whole once), and the transfers of every layer.
        plans = transfer_plans(self.layers, self.placement, placement)
        sources: Dict[Tuple[int, int], int] = {}
        for index, plan in enumerate(plans):
            for src, _ in plan:
                if src // S == me and (index, src % S) not in sources:
                    sources[(index, src % S)] = len(sources)
        with torch.no_grad():
            wholes = [self._whole(self.layers[i], s, opt, distributed, first)
                      for (i, s) in sources]
            if wholes and dp_size > 1:
                joined = torch.cat(wholes)
                dist.all_reduce(joined, group=dp_group)
                wholes = list(joined.split([w.numel() for w in wholes]))
            arrivals = exchange_slots(plans, group, S,
                                      lambda index, slot: wholes[sources[(index, slot)]],
                                      self._whole_width(), torch.float32, self.device)
            for (index, slot), flat in arrivals:
                self._write(self.layers[index], slot, flat, opt, distributed)
        self.set_placement(placement)
        return len(arrivals)

    def _whole_width(self) -> int:
        params = list(self.layers[0].experts.local_experts[0].parameters())
        return sum(p.numel() * (1 + len(self._state_keys(p))) for p in params)


def _placement_of(layer, arch, spec):
    from folding.placement.placement import Placement

    rows = layer.placement_rows
    return Placement(arch.num_experts, len(rows), spec.ep, layer.slots_per_rank,
                     spec.gpus_per_node, rows)


# --------------------------------------------------------------------------- the loop's hooks
class _LoopHook:
    """The Replacer of this rank, built at the first training step."""

    def __init__(self):
        self.replacer = None
        self.trainer = None
        self.shown = 0
        self.saved = None
        """What the checkpoint being resumed said (placement, statistics), when it said it."""

    def start(self, args, model, optimizer) -> None:
        from folding.run.replacement import Replacer

        self.trainer = MegatronTrainer(args, model, optimizer)
        self.replacer = Replacer(self.trainer, args.folding_replace_interval,
                                 args.folding_replace_max_moved,
                                 apply_after=args.folding_replace_apply_after,
                                 time_limit=args.folding_replace_time_limit,
                                 always=args.folding_replace_always)
        if self.saved is not None:
            self.replacer.resume(self.saved)
        _say(f"> folding: re-placement every {args.folding_replace_interval} steps, at most "
             f"{args.folding_replace_max_moved:g} of each layer's slots moved"
             + (", applied whatever it saves" if args.folding_replace_always else ""))

    def after_step(self, steps_done: int, last: bool) -> None:
        """The boundary after ``steps_done`` steps; ``last``: the loop stops there, so a solve
        still in flight is judged now and reported, not applied (``Replacer.finish``)."""
        self.trainer.steps_done = steps_done
        self.replacer.after_step()
        if last:
            self.replacer.finish()
        self._show()

    def stop(self) -> None:
        """The loop stops early: Megatron's rerun machinery, a signal or its time limit (a solve
        already judged at the last boundary is not judged twice)."""
        self.replacer.finish()
        self._show()

    def _show(self) -> None:
        for attempt in self.replacer.attempts[self.shown:]:
            _say(f"> folding: {attempt.line()}")
        self.shown = len(self.replacer.attempts)


def _last_iteration(args, steps_done: int) -> bool:
    """Whether Megatron's loop stops after ``steps_done`` steps on its count of iterations
    (``--train-iters``, ``--exit-interval``). A stop on time (``--exit-duration-in-mins``) or on
    a signal is decided after the step, by ``checkpoint_and_decide_exit``
    (``_wrapped_decide_exit``)."""
    if args.train_iters is not None and steps_done >= args.train_iters:
        return True
    exit_interval = getattr(args, "exit_interval", None)
    return bool(exit_interval) and steps_done % exit_interval == 0


def _wrapped_train_step(original, hook: _LoopHook):
    @functools.wraps(original)
    def train_step(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs):
        from megatron.training import get_args

        args = get_args()
        if not enabled(args):
            return original(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs)
        if hook.replacer is None:
            hook.start(args, model, optimizer)
        result = original(forward_step_func, data_iterator, model, optimizer, *rest, **kwargs)
        if result[3]:  # should_exit: no boundary to switch at
            hook.stop()
            return result
        # A skipped update (a NaN gradient) is still a boundary: moving the unchanged state is
        # as exact as moving a stepped one.
        iteration = kwargs.get("iteration")
        if iteration is None:
            iteration = getattr(args, "curr_iteration", 0)
        steps_done = int(iteration) + 1
        hook.after_step(steps_done, _last_iteration(args, steps_done))
        return result

    return train_step


def _wrapped_decide_exit(original, hook: _LoopHook):
    """Megatron decides every early exit (a signal, ``--exit-duration-in-mins``,
    ``--exit-interval``) here, on every rank alike, after saving: a solve still in flight is
    judged and reported before the loop stops, as at the last iteration."""

    @functools.wraps(original)
    def checkpoint_and_decide_exit(*args, **kwargs):
        should_exit = original(*args, **kwargs)
        if should_exit and hook.replacer is not None:
            hook.stop()
        return should_exit

    return checkpoint_and_decide_exit


def _checkpoint_folder(save_dir: str, iteration: int) -> str:
    from megatron.training.checkpointing import get_checkpoint_name

    return get_checkpoint_name(save_dir, iteration, release=False, return_base_dir=True)


def _wrapped_save_checkpoint(original, hook: _LoopHook):
    @functools.wraps(original)
    def save_checkpoint(iteration, *rest, **kwargs):
        import torch.distributed as dist
        from megatron.training import get_args

        result = original(iteration, *rest, **kwargs)
        args = get_args()
        if hook.replacer is not None and args.save:
            meta = hook.replacer.checkpoint_meta()  # a collective: every rank saves
            if dist.get_rank() == 0:
                folder = _checkpoint_folder(args.save, iteration)
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, STATE_FILE), "w") as out:
                    json.dump(meta, out)
        return result

    return save_checkpoint


def _iteration_to_load(args) -> Optional[int]:
    from megatron.training.checkpointing import get_checkpoint_tracker_filename

    step = getattr(args, "ckpt_step", None)
    if step is not None:
        return int(step)
    tracker = get_checkpoint_tracker_filename(args.load)
    if not os.path.isfile(tracker):
        return None
    text = open(tracker).read().strip()
    return int(text) if text.isdigit() else None


def _wrapped_load_checkpoint(original, hook: _LoopHook):
    @functools.wraps(original)
    def load_checkpoint(model, optimizer, *rest, **kwargs):
        from megatron.training import get_args

        from folding.placement.placement import Placement

        args = get_args()
        load = getattr(args, "load", None)
        if enabled(args) and load:
            iteration = _iteration_to_load(args)
            path = None if iteration is None else \
                os.path.join(_checkpoint_folder(load, iteration), STATE_FILE)
            if path is not None and os.path.isfile(path):
                with open(path) as f:
                    hook.saved = json.load(f)
                trainer = MegatronTrainer(args, model, optimizer)
                saved = Placement.from_json(hook.saved["placement"], path)
                saved.validate(num_experts=trainer.arch.num_experts,
                               num_layers=trainer.placement.num_layers, ep_size=trainer.spec.ep)
                trainer.set_placement(saved)
                _say(f"> folding: resuming with the placement and routing statistics saved "
                     f"at iteration {iteration}")
        return original(model, optimizer, *rest, **kwargs)

    return load_checkpoint


def install(patcher) -> "_LoopHook":
    """Wrap Megatron's ``train_step``, ``save_checkpoint``, ``load_checkpoint`` and
    ``checkpoint_and_decide_exit`` where ``megatron.training.training`` calls them (once: a
    second call changes nothing). They do nothing without ``--folding-replace-interval``."""
    import megatron.training.training as training

    if getattr(training.train_step, "folding_replacement", None) is not None:
        return training.train_step.folding_replacement
    hook = _LoopHook()
    step = _wrapped_train_step(training.train_step, hook)
    step.folding_replacement = hook
    patcher.set(training, "train_step", step)
    patcher.set(training, "save_checkpoint",
                _wrapped_save_checkpoint(training.save_checkpoint, hook))
    patcher.set(training, "load_checkpoint",
                _wrapped_load_checkpoint(training.load_checkpoint, hook))
    if hasattr(training, "checkpoint_and_decide_exit"):
        patcher.set(training, "checkpoint_and_decide_exit",
                    _wrapped_decide_exit(training.checkpoint_and_decide_exit, hook))
    return hook


def ensure_installed(args) -> None:
    """For a patched pretrain_gpt.py (``patches/``), which builds its folded layers through
    ``folding.megatron.plugin`` but never calls ``training_hooks.install``: with
    ``--folding-replace-interval``, check it and wrap Megatron's loop for the rest of the
    process (under ``folding megatron`` it is wrapped already)."""
    if not enabled(args):
        return
    check_arguments(args)
    try:
        import megatron.training.training  # noqa: F401
    except ImportError:
        raise FoldingError("--folding-replace-interval runs inside megatron.training's loop, "
                           "which is not installed") from None
    from folding.megatron.cpu_runtime import _Patcher

    install(_Patcher())
