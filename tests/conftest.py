import os
import sys
import warnings

import pytest

# Megatron warns on import when neither Apex nor Transformer Engine is installed: expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))


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
