"""Python 3.11 only, and only in processes started by ``folding megatron``: megatron.training
(megatron-core 0.19+) imports Python 3.12's ``typing.override``, a decorator that only marks
methods. The launcher adds this folder to PYTHONPATH, so the processes Megatron spawns itself
(torch_dist checkpoint writers re-import the training script) get the marker too."""
import sys
import typing

if sys.version_info < (3, 12) and not hasattr(typing, "override"):
    typing.override = lambda f: f
