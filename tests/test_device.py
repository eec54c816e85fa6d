"""--device: where the ranks of train, verify and the memory measurement run, decided once (one
GPU per rank with NCCL, or the CPU with gloo, never a mix), and the CPU runtime following it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from folding.errors import FoldingError
from folding.megatron import cpu_runtime
from folding.run.device import DEVICE_ENV, resolve_device

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


# ----------------------------------------------------------------------------- the decision
def test_cpu_is_the_cpu_whatever_the_gpus():
    choice = resolve_device("cpu", 8, cuda_available=True, device_count=8)
    assert (choice.kind, choice.backend) == ("cpu", "gloo")
    assert choice.reason == "--device cpu: 8 ranks on the CPU with gloo"


def test_cuda_without_cuda_is_refused_in_one_line():
    with pytest.raises(FoldingError) as e:
        resolve_device("cuda", 8, cuda_available=False, device_count=0)
    assert str(e.value) == ("--device cuda: CUDA is not available here (no GPU visible to torch); "
                            "use --device cpu or auto")


def test_cuda_with_fewer_gpus_than_ranks_names_both_numbers():
    with pytest.raises(FoldingError) as e:
        resolve_device("cuda", 8, cuda_available=True, device_count=2)
    assert str(e.value) == ("--device cuda needs one GPU per rank: 8 ranks, 2 GPUs visible; "
                            "use --device cpu or auto")


def test_cuda_with_a_gpu_per_rank():
    choice = resolve_device("cuda", 4, cuda_available=True, device_count=8)
    assert (choice.kind, choice.backend) == ("cuda", "nccl")
    assert choice.reason == "--device cuda: 8 GPUs for 4 ranks, one GPU per rank with NCCL"


def test_auto_with_too_few_gpus_uses_the_cpu_and_says_why():
    choice = resolve_device("auto", 8, cuda_available=True, device_count=2)
    assert (choice.kind, choice.backend) == ("cpu", "gloo")
    assert choice.reason == "auto: 2 GPUs for 8 ranks, using the CPU with gloo"


def test_auto_without_cuda_uses_the_cpu():
    choice = resolve_device("auto", 1, cuda_available=False, device_count=0)
    assert (choice.kind, choice.backend) == ("cpu", "gloo")
    assert choice.reason == "auto: CUDA is not available, using the CPU with gloo"


def test_auto_with_enough_gpus_uses_them_with_nccl():
    choice = resolve_device("auto", 8, cuda_available=True, device_count=8)
    assert (choice.kind, choice.backend) == ("cuda", "nccl")
    assert choice.reason == "auto: 8 GPUs for 8 ranks, one GPU per rank with NCCL"
    assert choice.to_json() == {"kind": "cuda", "backend": "nccl", "reason": choice.reason}


def test_an_unknown_device_is_refused():
    with pytest.raises(FoldingError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu", 8, cuda_available=True, device_count=8)


# ----------------------------------------------------------------------------- the CPU runtime
@pytest.mark.parametrize("requested, cuda, wanted", [
    ("cpu", True, True), ("cpu", False, True), ("cuda", True, False), ("cuda", False, False),
    ("", True, False), ("", False, True)])
def test_the_runtime_follows_the_chosen_device(requested, cuda, wanted):
    assert cpu_runtime.runtime_wanted(requested, cuda) is wanted


@pytest.mark.megatron
def test_a_cpu_rank_keeps_the_runtime_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    with cpu_runtime.cpu_runtime() as on:
        assert on
        # The rank sees what a CPU-only host shows: the model is configured for the CPU.
        assert not torch.cuda.is_available() and torch.cuda.device_count() == 0
        assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.cuda.is_available()  # the test's stand-in, restored
    monkeypatch.setenv(DEVICE_ENV, "cuda")
    with cpu_runtime.cpu_runtime() as on:
        assert not on


# ----------------------------------------------------------------------------- the commands
# One rank, one step: the quickest run of the real command (about 7 s on 2 cores).
TINY_TRAIN = ("--steps", "1", "--nproc", "1", "--tp", "1", "--ep", "1", "--gpus-per-node", "1")


def _folding(*argv):
    return subprocess.run([sys.executable, "-m", "folding", *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.smoke
def test_train_on_the_cpu_reports_the_device_in_json():
    proc = _folding("train", *TINY_TRAIN, "--device", "cpu", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["device"] == {"kind": "cpu", "backend": "gloo",
                             "reason": "--device cpu: 1 rank on the CPU with gloo"}
    assert out["steps"] == 1


@NO_CUDA
@pytest.mark.megatron
@pytest.mark.multiprocess
@pytest.mark.smoke
def test_train_auto_picks_the_cpu_here_and_says_why():
    proc = _folding("train", *TINY_TRAIN, "--device", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("trained tiny-moe for steps 1-1 on 1 CPU rank (gloo), ")
    assert lines[1] == "device: auto: CUDA is not available, using the CPU with gloo"


@NO_CUDA
@pytest.mark.parametrize("command", [("train", *TINY_TRAIN), ("verify", "--world-size", "2")])
def test_cuda_is_refused_here_in_one_line(cli, command):
    code, out, err = cli(*command, "--device", "cuda")
    assert code == 2 and out == ""
    assert err.splitlines() == [
        f"folding {command[0]}: error: --device cuda: CUDA is not available here (no GPU "
        f"visible to torch); use --device cpu or auto"]


@NO_CUDA
def test_the_memory_measurement_refuses_cuda_here(capsys):
    from folding.testing.memory_measure import main

    assert main(["--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "python -m folding.testing.memory_measure: error: --device cuda: CUDA is not available "
        "here (no GPU visible to torch); use --device cpu or auto"]
