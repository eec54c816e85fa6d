"""Megatron-LM's real pretrain_gpt.py, run on CPU ranks through ``folding megatron``: unmodified
with the ``--folding-*`` flags, and patched from ``patches/``, each against the same script
without the plugin. Megatron-LM's sources are not on PyPI, so this runs only with
``MEGATRON_LM_GIT`` naming a Megatron-LM git directory (``make megatron-lm-check``).

Each tag is exported with ``git archive``; its ``megatron`` package (core and training) is the
one that runs, since the launcher puts the script's folder first on the import path. The dataset
helpers are copied from the installed megatron-core (same source; compiling them needs pybind11)
and Megatron-LM 0.16's sources also import six, regex and pydantic.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_loop import (MODEL, TRAINING, launch, largest_relative_difference, losses,
                           needs_megatron_training)

pytestmark = [pytest.mark.megatron, pytest.mark.multiprocess, pytest.mark.slow]

PATCHES = Path(__file__).resolve().parents[1] / "patches"
TAGS = ("core_v0.16.1", "core_v0.19.0", "main")
FOLDING = ["--tensor-model-parallel-size", "2", "--sequence-parallel",
           "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1"]
PLUGIN = ["--folding-check-mesh", "--folding-dispatcher", "--folding-gpus-per-node", "2"]


def _export(git_dir: str, tag: str, into: Path) -> Path:
    archive = subprocess.run(["git", "--git-dir", git_dir, "archive", tag], check=True,
                             capture_output=True).stdout
    into.mkdir()
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    import megatron.core.datasets as installed

    for helper in Path(installed.__file__).parent.glob("helpers_cpp*.so"):
        shutil.copy(helper, into / "megatron" / "core" / "datasets")
    return into


def _run(checkout: Path, flags, tmp_path: Path, name: str):
    import json

    log = tmp_path / f"{name}.log"
    done = launch(4, MODEL + TRAINING + ["--train-iters", "20"] + FOLDING + list(flags),
                  script=checkout / "pretrain_gpt.py", log=log)
    lines = [l for l in done.stdout.splitlines() if l.startswith("{")]
    assert lines, f"{name}: no JSON (exit {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(lines[-1]) | {"stderr": done.stderr}


@pytest.mark.parametrize("tag", TAGS)
def test_megatron_lms_pretrain_gpt_trains_folded_as_it_trains_stock(tag, tmp_path):
    git_dir = os.environ.get("MEGATRON_LM_GIT")
    if not git_dir:
        pytest.skip("set MEGATRON_LM_GIT to a Megatron-LM git directory to run its pretrain_gpt.py")
    needs_megatron_training()
    checkout = _export(git_dir, tag, tmp_path / "stock")
    stock = _run(checkout, [], tmp_path, "stock")
    folded = _run(checkout, PLUGIN, tmp_path, "folded")
    assert any("FoldedMoELayer" in line for line in folded["plugin"]), folded["plugin"]
    iterations = range(1, 21)
    assert largest_relative_difference(losses(stock), losses(folded), iterations) <= 1e-5
    patch = PATCHES / f"megatron-lm-{tag}.patch"
    if patch.exists():  # the other way in: the patched script, folded once
        patched = _export(git_dir, tag, tmp_path / "patched")
        subprocess.run(["git", "apply", str(patch)], cwd=patched, check=True)
        through_patch = _run(patched, PLUGIN, tmp_path, "patched")
        assert sum("FoldedMoELayer" in line for line in through_patch["plugin"]) == 1
        assert largest_relative_difference(losses(stock), losses(through_patch), iterations) <= 1e-5


def test_megatron_lms_patched_pretrain_gpt_re_places_experts_exactly(tmp_path):
    """``--folding-replace-interval`` through the patched pretrain_gpt.py of the newest tagged
    patch: experts move every 4 iterations (any slot, whatever it saves) and the losses stay
    those of the same folded run without moving (within 1e-5 relative)."""
    git_dir = os.environ.get("MEGATRON_LM_GIT")
    if not git_dir:
        pytest.skip("set MEGATRON_LM_GIT to a Megatron-LM git directory to run its pretrain_gpt.py")
    needs_megatron_training()
    tag = "core_v0.19.0"
    patched = _export(git_dir, tag, tmp_path / "patched")
    subprocess.run(["git", "apply", str(PATCHES / f"megatron-lm-{tag}.patch")], cwd=patched,
                   check=True)
    # 8 experts, two per EP rank, so that a placement can put a pair together.
    fixed = _run(patched, PLUGIN + ["--num-experts", "8"], tmp_path, "fixed")
    moving = _run(patched, PLUGIN + ["--num-experts", "8", "--folding-replace-interval", "4",
                                     "--folding-replace-max-moved", "1",
                                     "--folding-replace-always",
                                     "--folding-replace-apply-after", "1"], tmp_path, "moving")
    applied = [line for line in moving["plugin"]
               if "re-placement at step" in line and "applied at" in line]
    assert len(applied) >= 3, moving["plugin"]
    assert largest_relative_difference(losses(fixed), losses(moving), range(1, 21)) <= 1e-5
