"""The plugin inside Megatron-LM's own training loop, with no patch to the script.

``install(patcher)`` wraps two functions every Megatron-LM GPT script of core_v0.16 to current
main goes through, whatever it does around them:

- ``megatron.training.arguments.parse_args`` and ``validate_args``: Megatron's parser gains the
  ``--folding-*`` group (after the script's own extra-args provider), and the folding is checked
  as soon as Megatron has validated the arguments, before any process group exists;
- ``GPTModel.__init__``: where a script hands Megatron its layer spec, with
  ``--context-parallel-size`` > 1 its local core attention becomes the plugin's
  context-parallel one, with ``--folding-dispatcher`` every MoE layer of it becomes
  ``FoldedMoELayer``; with
  ``--folding-check-mesh`` the first model built on a rank (Megatron has built its groups by
  then, and every rank builds its first chunk together) compares every group with the folded
  mesh;
- ``train_step``, ``save_checkpoint`` and ``load_checkpoint`` of ``megatron.training.training``:
  with ``--folding-replace-interval`` the experts are re-placed between two steps
  (``folding.megatron.replacement``).

Both go through ``folding.megatron.plugin``, which the patches in ``patches/`` call too. A script
that is itself patched keeps working: the flags are added once and a spec is folded once.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Optional

from folding.errors import FoldingError


def _has_folding_arguments(parser) -> bool:
    return any(action.dest == "folding_dispatcher" for action in parser._actions)


def with_plugin_arguments(then=None):
    """Megatron's extra-args convention: the script's provider (``then``), then the plugin's
    flags unless the script (a patched one) added them already."""
    from folding.megatron import plugin

    def provide(parser):
        if then is not None:
            parser = then(parser)
        return parser if _has_folding_arguments(parser) else plugin.add_arguments(parser)

    return provide


def uses_folding(args) -> bool:
    return bool(getattr(args, "folding_dispatcher", False) or getattr(args, "folding_check_mesh", False)
                or getattr(args, "folding_placement", None))


def check_arguments(args) -> None:
    """Refuse a bad folding, a flag the folded dispatcher cannot train with, or a context-parallel
    setting the plugin's CP attention cannot run (FoldingError).

    Needs only validated arguments, so it runs before Megatron builds anything.
    """
    from folding.megatron import plugin
    from folding.megatron.model import have_transformer_engine

    if getattr(args, "context_parallel_size", 1) > 1 and not (
            getattr(args, "transformer_impl", "local") == "transformer_engine"
            and have_transformer_engine()):
        plugin.spec_from_args(args)  # the plugin's CP attention: its comm types, a2a's heads
    from folding.megatron import replacement

    replacement.check_arguments(args)
    if not uses_folding(args):
        return
    if args.folding_placement and not args.folding_dispatcher:
        raise FoldingError("--folding-placement needs --folding-dispatcher: Megatron's own "
                           "dispatcher always uses its contiguous expert layout")
    plugin.spec_from_args(args)
    if args.folding_dispatcher:
        plugin.folded_layer_arguments(args)


def _wrapped_parse_args(original):
    @functools.wraps(original)
    def parse_args(extra_args_provider=None, ignore_unknown_args=False):
        return original(with_plugin_arguments(extra_args_provider), ignore_unknown_args)

    return parse_args


def _wrapped_validate_args(original):
    @functools.wraps(original)
    def validate_args(args, *rest, **kwargs):
        result = original(args, *rest, **kwargs)
        check_arguments(args)
        return result

    return validate_args


class _ModelHook:
    """What runs where a script builds its ``GPTModel``; remembers whether the mesh was checked."""

    def __init__(self, original_init):
        self.original_init = original_init
        self.signature = inspect.signature(original_init)
        self.mesh_checked = False
        self.folding_arguments = None

    def __call__(self, model, *args, **kwargs):
        from megatron.training import get_args

        from folding.megatron import plugin

        megatron_args = get_args()
        if getattr(megatron_args, "folding_check_mesh", False) and not self.mesh_checked:
            spec = plugin.spec_from_args(megatron_args)
            groups = plugin.check_mesh(spec)
            self.mesh_checked = True
            _say(f"> folding: Megatron's process groups equal the folded mesh {spec.describe()} "
                 f"on every rank ({groups} groups on rank 0)")
        bound = self.signature.bind(model, *args, **kwargs)
        spec = plugin.context_parallel_spec(bound.arguments["transformer_layer_spec"], megatron_args)
        bound.arguments["transformer_layer_spec"] = spec
        if not getattr(megatron_args, "folding_dispatcher", False):
            self.original_init(*bound.args, **bound.kwargs)
            return self._say_context_parallel(model, megatron_args)
        if self.folding_arguments is None:
            self.folding_arguments = plugin.folded_layer_arguments(megatron_args)
        bound.arguments["transformer_layer_spec"] = plugin.fold(spec, *self.folding_arguments)
        self.original_init(*bound.args, **bound.kwargs)
        self._say_context_parallel(model, megatron_args)
        from folding.dispatcher.moe_layer import FoldedMoELayer

        folded = sum(isinstance(m, FoldedMoELayer) for m in model.modules())
        _say(f"> folding: {folded} MoE layer(s) of this model chunk dispatch through "
             f"FoldedMoELayer, experts placed by "
             f"{megatron_args.folding_placement or 'Megatron contiguous layout'}")


    @staticmethod
    def _say_context_parallel(model, megatron_args) -> None:
        from folding.context_parallel.attention import ContextParallelAttention

        layers = [m for m in model.modules() if isinstance(m, ContextParallelAttention)]
        if layers:
            _say(f"> folding: {len(layers)} attention layer(s) of this model chunk run "
                 f"context-parallel over CP={megatron_args.context_parallel_size} "
                 f"({layers[0].cp_comm_type}) without Transformer Engine")


def _say(line: str) -> None:
    """Print on global rank 0, as Megatron's print_rank_0 does."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)


def install(patcher=None):
    """Put the plugin into ``megatron.training`` and ``GPTModel``; returns the patcher whose
    ``restore()`` takes it out again (a new one unless given).

    Modules that imported ``parse_args`` by name before this ran get the wrapped one too.
    """
    import megatron.training.arguments as arguments

    from folding.megatron.cpu_runtime import _Patcher

    patcher = patcher if patcher is not None else _Patcher()
    from megatron.core.models.gpt.gpt_model import GPTModel

    for function, wrap in (("parse_args", _wrapped_parse_args),
                           ("validate_args", _wrapped_validate_args)):
        original = getattr(arguments, function)
        wrapped = wrap(original)
        for name, module in list(sys.modules.items()):
            if name.startswith("megatron") and getattr(module, function, None) is original:
                patcher.set(module, function, wrapped)
    hook = _ModelHook(GPTModel.__init__)

    @functools.wraps(GPTModel.__init__)
    def __init__(self, *args, **kwargs):
        hook(self, *args, **kwargs)

    patcher.set(GPTModel, "__init__", __init__)
    # --folding-replace-interval: Megatron's train_step and checkpointing, where train() calls them.
    from folding.megatron import replacement

    replacement.install(patcher)
    return patcher


def validated_arguments(argv, world_size: Optional[int] = None, defaults=None):
    """Megatron's parse and validation of a script's arguments with the plugin's flags, as a
    rank would see them (``parse_args`` reads the world size from the environment). Megatron's
    argument dump is not printed."""
    import contextlib
    import io
    import os

    import megatron.training.arguments as arguments

    saved_argv, saved_world = sys.argv, os.environ.get("WORLD_SIZE")
    sys.argv = ["megatron"] + list(argv)
    if world_size is not None:
        os.environ["WORLD_SIZE"] = str(world_size)
    try:
        args = arguments.parse_args(with_plugin_arguments(), ignore_unknown_args=False)
        with contextlib.redirect_stdout(io.StringIO()):
            arguments.validate_args(args, defaults or {})
        return args
    finally:
        sys.argv = saved_argv
        if world_size is not None:
            if saved_world is None:
                os.environ.pop("WORLD_SIZE", None)
            else:
                os.environ["WORLD_SIZE"] = saved_world
