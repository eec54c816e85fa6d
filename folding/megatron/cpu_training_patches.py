"""What Megatron's training package (``megatron.training``) needs on top of the core's CPU
runtime, each with the reason. ``apply(patcher)`` installs them; ``cpu_runtime(training=True)``
calls it and the patcher restores everything when the runtime stops.

Nothing here changes arithmetic: it answers questions about a GPU that is not there (device
properties, memory counters) and skips set-up that only a GPU or a source checkout needs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import sys
import types
import typing


class _CpuDeviceProperties(types.SimpleNamespace):
    """What ``torch.cuda.get_device_properties`` answers: no compute capability, so every
    Hopper- or Blackwell-only path stays off."""


def _device_properties(*args, **kwargs):
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 0
    return _CpuDeviceProperties(name="cpu", major=0, minor=0, total_memory=total,
                                multi_processor_count=os.cpu_count() or 1)


def _memory_stats(*args, **kwargs):
    return {}


def _zero(*args, **kwargs):
    return 0


def _nothing(*args, **kwargs):
    return None


def _without_cuda_assert(original):
    """``initialize_megatron`` asserts CUDA unless told ``allow_no_cuda``; everything else it
    does (groups, seeds, timers) runs as it is."""

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    return initialize_megatron


def _compile_helpers_if_missing(original):
    """Rank 0 runs ``make`` on the dataset helpers at start-up. The wheel ships them compiled
    and without a Makefile, so ``make`` fails there; a source checkout still compiles."""

    @functools.wraps(original)
    def compile_helpers():
        try:
            importlib.import_module("megatron.core.datasets.helpers_cpp")
        except ImportError:
            return original()
        return None

    return compile_helpers


def _optimizer_state_before_loading(original):
    """Without Apex or Transformer Engine, Megatron's distributed optimizer reads Adam's step
    from torch's optimizer state, which exists only after a first step, so a run cannot resume.
    Before a load, give the state its shape the way Megatron does for Megatron-FSDP (one step
    with zero gradients); the load then overwrites parameters and moments alike."""

    signature = inspect.signature(original)

    @functools.wraps(original)
    def sharded_state_dict(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        if bound.arguments.get("is_loading") and not self.optimizer.state:
            self._init_optimizer_states_with_dummy_values()
        return original(self, *args, **kwargs)

    return sharded_state_dict


def _own_step_per_parameter(original):
    """Without Apex or Transformer Engine the distributed optimizer gives torch's Adam one "step"
    tensor shared by every parameter when it loads a checkpoint; Adam then counts each
    parameter's update on that one tensor, so after a resume the step runs ahead and the bias
    correction is wrong. After the load every parameter gets its own copy."""

    @functools.wraps(original)
    def load_state_dict(self, *args, **kwargs):
        import torch

        result = original(self, *args, **kwargs)
        for state in self.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.clone()
        return result

    return load_state_dict


def _loading_main_params(original):
    """Two gaps of the distributed optimizer's load without Apex or Transformer Engine:

    - it copies into the main parameters, which in an fp32 run are the model's own leaf
      parameters, and autograd refuses that in-place copy: a load is never part of a graph, so
      it runs without autograd;
    - torch's Adam keeps a "step" tensor per parameter, which the fully reshardable format
      leaves out of each parameter's tensors (it restores the step with the parameter groups),
      so the copy looks for a key that is not there: a key the checkpoint does not carry is
      left as it is.
    """

    @functools.wraps(original)
    def load(self, model_param, tensors):
        import torch

        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        absent = {k: None for k in self.optimizer.state.get(main_param, {}) if k not in tensors}
        with torch.no_grad():
            return original(self, model_param, {**absent, **tensors})

    return load


def apply(p) -> None:
    import torch

    cuda = torch.cuda
    # One "device" per rank: initialize_megatron builds the model-parallel groups only when it
    # counts a device.
    p.set(cuda, "device_count", lambda: 1)
    p.set(cuda, "get_device_properties", _device_properties)
    p.set(cuda, "get_device_capability", lambda *a, **k: (0, 0))
    p.set(cuda, "get_device_name", lambda *a, **k: "cpu")
    # Memory reports: no device memory is used.
    for name in ("memory_reserved", "max_memory_reserved"):
        p.set(cuda, name, _zero)
    p.set(cuda, "reset_peak_memory_stats", _nothing)
    p.set(cuda, "memory_stats", _memory_stats)
    # Python 3.11: megatron.training marks methods with Python 3.12's typing.override, a
    # decorator that only marks.
    if sys.version_info < (3, 12):
        p.set(typing, "override", lambda f: f)
    for module in ("megatron.training.initialize", "megatron.training.training"):
        p.set_in_module(module, "initialize_megatron",
                        _without_cuda_assert(importlib.import_module(module).initialize_megatron))
    # Start-up warms the fused bias-activation kernels up with torch.compile; Megatron's CPU flags
    # switch those fusions off, and Inductor would look for a GPU to compile for.
    p.set_in_module("megatron.training.initialize", "_warmup_jit_function", _nothing)
    # Megatron-LM up to 0.17 builds its legacy fused softmax kernels with nvcc at start-up.
    p.set_in_module("megatron.legacy.fused_kernels", "load", _nothing)
    from megatron.core.optimizer import distrib_optimizer

    if not getattr(distrib_optimizer, "HAVE_APEX_OR_TE", True):
        optimizer_class = distrib_optimizer.DistributedOptimizer
        p.set(optimizer_class, "sharded_state_dict",
              _optimizer_state_before_loading(optimizer_class.sharded_state_dict))
        p.set(optimizer_class, "load_state_dict",
              _own_step_per_parameter(optimizer_class.load_state_dict))
        p.set(optimizer_class, "_set_main_param_and_optimizer_states",
              _loading_main_params(optimizer_class._set_main_param_and_optimizer_states))
    p.set_in_module("megatron.core.datasets.utils", "compile_helpers",
                    _compile_helpers_if_missing(
                        importlib.import_module("megatron.core.datasets.utils").compile_helpers))
