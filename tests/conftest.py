import os
import sys
import warnings
from types import SimpleNamespace

import pytest

# Megatron warns on import when neither Apex nor Transformer Engine is installed: expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
import megatron_training_shim  # noqa: E402,F401 - before any test imports megatron.training


@pytest.fixture
def cli(capsys):
    """The command line in-process: ``cli(*args)`` returns (exit status, stdout, stderr)."""
    from folding.cli import main

    def run(*args):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse errors
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def megatron_arguments(monkeypatch):
    """``megatron.training.arguments``, with the GPU questions of ``validate_args`` answered for
    an H100 (compute capability 9.0, the GPUs the flags are for); skipped without
    ``megatron.training``."""
    arguments = pytest.importorskip(
        "megatron.training.arguments",
        reason="megatron.training is not installed (megatron-core 0.16.1's wheel has no "
               "megatron/training; the megatron-core 0.19.2 job runs this)")
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda *a, **k: SimpleNamespace(major=9, minor=0, name="H100"))
    return arguments
