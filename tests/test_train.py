"""folding train: the loss falls, checkpoints resume exactly, and a killed rank stops the run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from folding.errors import FoldingError
from folding.layout import checkpoint
from folding.layout.parameters import full_parameters
from folding.recipe import load_recipe

# One module fixture spawns every case; the limit is for a hang, not for a slow machine.
# On megatron-core 0.19.2 `folding train` runs in test_replacement, test_train_context_parallel
# and test_device, and Megatron's checkpoints resume across foldings in test_megatron_loop: this
# module's 61 steps on 8 ranks run on 0.16.1 only.
pytestmark = [pytest.mark.megatron, pytest.mark.primary_only, pytest.mark.multiprocess,
              pytest.mark.slow, pytest.mark.timeout(1800)]


def relative_differences(resumed, reference):
    return [abs(a - b) / b for a, b in zip(resumed, reference)]


def folding_train(*argv, env=None):
    proc = subprocess.run([sys.executable, "-m", "folding", "train", *argv, "--json"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("ckpt"))
    traces = tmp_path_factory.mktemp("traces")
    return {
        "whole": folding_train("--steps", "20", "--trace-out", str(traces / "pp1.npz"),
                               "--trace-tokens", "2048"),
        "pp2 trace": folding_train("--steps", "1", "--pp", "2", "--trace-out", str(traces / "pp2.npz"),
                                   "--trace-tokens", "2048"),
        "traces": traces,
        "first": folding_train("--steps", "10", "--save", ckpt),
        "second": folding_train("--steps", "10", "--load", ckpt),
        "second TP1 EP8": folding_train("--steps", "10", "--load", ckpt, "--tp", "1", "--ep", "8"),
        "second TP2 PP2 EP4": folding_train("--steps", "10", "--load", ckpt, "--pp", "2"),
        "ckpt": ckpt,
    }


def test_loss_falls_on_the_corpus(runs):
    whole = runs["whole"]
    assert whole["folding"] == "TP2 CP1 DP4 PP1 | ETP1 EP4 EDP2"  # attention and MoE layouts differ
    assert abs(whole["first_loss"] - 5.545) < 0.05  # ln 256: a uniform guess over bytes
    assert whole["last_loss"] < 3.5  # mean of steps 11-20 (measured 3.32)


def test_resume_same_folding_is_bit_identical(runs):
    assert runs["first"]["losses"] + runs["second"]["losses"] == runs["whole"]["losses"]
    assert runs["second"]["first_step"] == 10


@pytest.mark.parametrize("second", ["second TP1 EP8", "second TP2 PP2 EP4"])
def test_resume_under_another_folding(runs, second):
    reference = runs["whole"]["losses"][10:]
    resumed = runs[second]["losses"]
    rel = relative_differences(resumed, reference)
    # Re-sharded, the same function from the same state: within folding verify's loss tolerance
    # while every token routes as before (measured: at most 6e-8, rounding of another reduction
    # order). A near-tie that routes one token to another expert moves the loss by more from
    # there on (measured on a fresh install in December 2026: TP1 EP8 from the 18th resumed
    # step, 4.7e-5, then 2.7e-6 and 1.9e-5); a re-sharding error shows from the first steps.
    print(f"{second}: resumed steps 11-20, relative loss differences {max(rel):.1e} at most")
    assert len(rel) == 10
    assert max(rel) <= 1e-5


@pytest.mark.skipif(not os.environ.get("FOLDING_LONG_TESTS"),
                    reason="140 steps on 8 ranks: set FOLDING_LONG_TESTS=1 (make test-long)")
def test_twenty_steps_resume_for_twenty_more_under_any_folding(tmp_path):
    """The resume at full length (20 steps, save, 20 more in a fresh process), against one
    uninterrupted 40-step run: the same folding to the bit, three others within folding verify's
    loss tolerance. CI's fixture above runs the same at 10 + 10."""
    from folding.run.verify import LOSS_TOLERANCE

    ckpt = str(tmp_path / "ckpt")
    whole = folding_train("--steps", "40")["losses"]
    assert folding_train("--steps", "20", "--save", ckpt)["losses"] == whole[:20]
    assert folding_train("--steps", "20", "--load", ckpt)["losses"] == whole[20:]
    for name, flags in {"TP1 EP8": ["--tp", "1", "--ep", "8"], "TP2 PP2 EP4": ["--pp", "2"],
                        "TP4 ETP2 EP2": ["--tp", "4", "--etp", "2", "--ep", "2"]}.items():
        resumed = folding_train("--steps", "20", "--load", ckpt, *flags)["losses"]
        rel = relative_differences(resumed, whole[20:])
        print(f"{name}: resumed steps 21-40, relative loss differences {max(rel):.1e} at most")
        assert len(rel) == 20 and max(rel) <= LOSS_TOLERANCE, (name, rel)


def test_checkpoint_holds_the_full_model(runs):
    arch = load_recipe("tiny-moe").model
    saved = checkpoint.read(runs["ckpt"], arch)
    assert set(saved["model"]) == set(full_parameters(arch))
    assert saved["meta"]["step"] == 10 and saved["optimizer"]["step"] == 10
    assert len(saved["meta"]["losses"]) == 10


def test_bad_checkpoints_are_refused(tmp_path):
    arch = load_recipe("tiny-moe").model
    with pytest.raises(FoldingError, match="is not a checkpoint: model.pt is missing"):
        checkpoint.read(str(tmp_path), arch)
    shapes = full_parameters(arch)
    model = {n: torch.zeros(s) for n, s in shapes.items()}
    model["output_layer.weight"] = torch.zeros(3, 3)
    torch.save(model, tmp_path / "model.pt")
    torch.save({}, tmp_path / "optimizer.pt")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(FoldingError, match=r"output_layer.weight has shape \(3, 3\)"):
        checkpoint.read(str(tmp_path), arch)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(FoldingError, match="meta.json is not valid JSON"):
        checkpoint.read(str(tmp_path), arch)
    proc = subprocess.run([sys.executable, "-m", "folding", "train", "--load", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "is not a checkpoint" in proc.stderr


def test_killed_rank_stops_every_rank(tmp_path):
    env = dict(os.environ, FOLDING_PID_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "folding", "train", "--steps", "100000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    pids = {}
    deadline = time.monotonic() + 120
    while len(pids) < 8 and time.monotonic() < deadline:
        for r in range(8):
            f = tmp_path / f"rank-{r}.pid"
            if f.exists() and f.read_text():
                pids[r] = int(f.read_text())
        time.sleep(0.5)
    assert len(pids) == 8, "ranks did not start"
    time.sleep(15)  # let training start
    os.kill(pids[3], signal.SIGKILL)
    killed_at = time.monotonic()
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.monotonic() - killed_at < 60
    assert proc.returncode == 2
    assert "rank 3 failed: killed by signal 9" in err
    time.sleep(1)
    alive = [r for r, pid in pids.items() if os.path.exists(f"/proc/{pid}") and
             "zombie" not in open(f"/proc/{pid}/status").read().lower()]
    assert alive == []


def test_routing_trace_joins_layers_across_pipeline_stages(runs):
    from folding.placement.trace import load_trace

    pp1 = load_trace(runs["traces"] / "pp1.npz")
    pp2 = load_trace(runs["traces"] / "pp2.npz")
    assert runs["whole"]["traced_tokens"] == 2048 and pp1.topk.shape == (4, 2048, 2)
    assert pp2.topk.shape == (4, 2048, 2)
    # The first micro-batch of stream (DP 0, TP 0) is the same 128 tokens in both layouts, routed
    # by the same initial weights: PP2 records layers 0-1 and 2-3 on different ranks, and the
    # joined trace must line them up token for token.
    same = (pp1.topk[:, :128] == pp2.topk[:, :128]).all(axis=2).mean()
    assert same >= 0.99
    # Another token range of the same layouts is not the same (the check can fail).
    assert (pp1.topk[:, 128:256] == pp2.topk[:, :128]).all(axis=2).mean() < 0.5
