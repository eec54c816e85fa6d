"""``folding megatron``'s pieces that need no ranks: the CPU flags, the hooks it puts into
Megatron's training package and takes out again, and the training runtime's reversibility."""

from __future__ import annotations

import pytest
import torch

from folding.megatron.launcher import CPU_FLAGS, with_cpu_flags


def test_cpu_flags_are_added_unless_given():
    argv = with_cpu_flags(["--num-layers", "2", "--transformer-impl=local",
                           "--distributed-backend", "nccl"])
    assert argv[:4] == ["--num-layers", "2", "--transformer-impl=local", "--distributed-backend"]
    assert argv.count("--distributed-backend") == 1 and "nccl" in argv and "gloo" not in argv
    assert argv.count("--transformer-impl") == 0  # given as --transformer-impl=local
    for flag, value in CPU_FLAGS[2:]:
        assert argv.count(flag) == 1 and value is None


@pytest.mark.megatron
def test_install_puts_the_plugin_into_megatron_and_restore_takes_it_out():
    arguments = pytest.importorskip("megatron.training.arguments")
    from megatron.core.models.gpt.gpt_model import GPTModel

    from folding.megatron import training_hooks

    before = (arguments.parse_args, arguments.validate_args, GPTModel.__init__)
    hooks = training_hooks.install()
    try:
        assert arguments.parse_args is not before[0] and arguments.validate_args is not before[1]
        assert GPTModel.__init__ is not before[2]
        args = training_hooks.validated_arguments(
            ["--num-layers", "2", "--hidden-size", "8", "--num-attention-heads", "2",
             "--seq-length", "8", "--max-position-embeddings", "8", "--micro-batch-size", "1",
             "--num-experts", "2", "--expert-model-parallel-size", "2", "--folding-dispatcher",
             "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--tokenizer-type",
             "NullTokenizer", "--vocab-size", "64", "--transformer-impl", "local"],
            world_size=2)
        assert args.folding_dispatcher and not args.folding_check_mesh
    finally:
        hooks.restore()
    assert (arguments.parse_args, arguments.validate_args, GPTModel.__init__) == before


@pytest.mark.megatron
def test_the_training_runtime_is_switched_off_without_a_trace():
    pytest.importorskip("megatron.training.initialize")
    import megatron.training.training as training

    from folding.megatron.cpu_runtime import cpu_runtime

    names = ("device_count", "get_device_properties", "memory_reserved", "is_current_stream_capturing")
    before = [getattr(torch.cuda, n) for n in names] + [training.initialize_megatron]
    with cpu_runtime(training=True) as on:
        assert on and torch.cuda.device_count() == 1
        assert torch.cuda.get_device_properties(0).major == 0
        assert training.initialize_megatron is not before[-1]
    assert [getattr(torch.cuda, n) for n in names] + [training.initialize_megatron] == before


@pytest.mark.megatron
def test_a_cpu_rank_tells_the_runtime_it_runs_on_the_cpu(tmp_path, monkeypatch):
    """``folding megatron --cpu`` on a host with GPUs must still train on the CPU: the rank sets
    the device the CPU runtime reads before the script runs."""
    pytest.importorskip("megatron.training.arguments")
    from folding.megatron.launcher import run_rank
    from folding.run.device import DEVICE_ENV

    monkeypatch.delenv(DEVICE_ENV, raising=False)
    seen = tmp_path / "device.txt"
    script = tmp_path / "script.py"
    script.write_text(f"import os\nopen({str(seen)!r}, 'w').write(os.environ.get({DEVICE_ENV!r}, 'unset'))\n")
    assert run_rank(str(script), [], cpu=True) == 0
    assert seen.read_text() == "cpu"
    monkeypatch.delenv(DEVICE_ENV, raising=False)
    assert run_rank(str(script), [], cpu=False) == 0
    assert seen.read_text() == "unset"
