"""`folding predict` and the calibrated step-time model behind it: JSON keys, MFU against an
independent FLOPs count, the breakdown adding up, the same numbers as `folding plan`, FP8, and
one-line errors with exit status 2."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from folding.cost.calibration import FITTED, Calibration
from folding.cost.flops import training_flops
from folding.cost.hardware import H100_SXM
from folding.cost.planner import plan, same_degrees
from folding.cost.predict import Predictor
from folding.cost.step_time import StepTimeModel
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup, load_recipe

MIXTRAL = ("--recipe", "mixtral-8x22b", "--gpus", "128", "--tp", "2", "--pp", "8", "--vpp", "7",
           "--ep", "8", "--etp", "1")


def test_predict_json_keys_and_mfu_from_an_independent_flops_count(cli):
    code, out, err = cli("predict", *MIXTRAL, "--json")
    assert code == 0, err
    data = json.loads(out)
    for key in ("mfu", "tflops_per_gpu", "step_time_s", "memory_gb", "breakdown_s", "folding"):
        assert key in data
    assert data["folding"]["dp"] == 8 and data["folding"]["edp"] == 2  # derived
    assert data["mfu"] == pytest.approx(data["tflops_per_gpu"] * 1e12 / (989.4 * 1e12))
    r = load_recipe("mixtral-8x22b")
    flops = training_flops(r.model, 4096, 256, 2)
    assert data["tflops_per_gpu"] == pytest.approx(flops / (data["step_time_s"] * 1e12 * 128))
    # the breakdown is the step: compute, TP, CP, EP, overheads, bubble, p2p, DP, optimizer
    assert sum(data["breakdown_s"].values()) == pytest.approx(data["step_time_s"], rel=1e-9)
    assert data["breakdown_s"]["pp_bubble"] > 0 and data["breakdown_s"]["ep"] > 0
    assert 0 < data["mfu"] < 1 and 40 < data["memory_gb"] < 76


def test_predict_text_output(cli):
    code, out, err = cli("predict", *MIXTRAL)
    assert code == 0, err
    assert "MFU" in out and "pp_bubble" in out and "TP2 CP1 DP8 PP8 VPP7 | ETP1 EP8 EDP2" in out


def test_plan_ranks_with_the_same_model_as_predict():
    r = load_recipe("qwen2-57b-a14b")
    result = plan(r.model, r.training, H100_SXM, 64, 8, 80, micro_batch_sizes=(1,),
                  recompute=("none",), max_cp=1)
    row = next(x for x in result.rows if same_degrees(x.spec, tp=2, pp=4, vpp=7, ep=4, etp=1))
    predictor = Predictor(r.model, r.training, H100_SXM)
    alone = predictor.predict(predictor.spec(64, 8, tp=2, pp=4, vpp=7, ep=4, etp=1), 1, "none")
    assert alone.time.total == pytest.approx(row.time.total, rel=1e-12)
    assert alone.memory_gb == pytest.approx(row.memory_gb, rel=1e-12)
    # and it can tell them apart: the uncalibrated roofline gives another time
    raw = plan(r.model, r.training, H100_SXM, 64, 8, 80, micro_batch_sizes=(1,),
               recompute=("none",), max_cp=1, calibration=None)
    raw_row = next(x for x in raw.rows if same_degrees(x.spec, tp=2, pp=4, vpp=7, ep=4, etp=1))
    assert raw_row.time.total < 0.9 * row.time.total


MOE = ModelArch(num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                vocab_size=32000, ffn_hidden_size=4096, num_experts=8, moe_router_topk=2)


def test_calibrated_terms_by_hand():
    """GEMM shape efficiency, FP8 casts, routing imbalance and overheads, each computed here."""
    cal = dataclasses.replace(FITTED, gemm_efficiency=0.8, gemm_half_dim=256.0, fp8_cast_bytes=4.0,
                              fp8_gemm_efficiency=0.9)
    bf16 = StepTimeModel(MOE, TrainingSetup(seq_length=4096), H100_SXM, calibration=cal)
    assert bf16._gemm(4096, 1024, 2048) == pytest.approx(
        2 * 4096 * 1024 * 2048 / (989.4e12 * 0.8 * 1024 / (1024 + 256)))
    fp8 = StepTimeModel(MOE, TrainingSetup(seq_length=4096, precision="fp8"), H100_SXM,
                        calibration=cal)
    assert fp8._gemm(4096, 1024, 2048) == pytest.approx(
        2 * 4096 * 1024 * 2048 / (1978.9e12 * 0.9 * 0.8 * 1024 / (1024 + 256))
        + 4.0 * (4096 * 2048 + 2048 * 1024) / 3350e9)
    spec = FoldingSpec(world_size=8, ep=4, num_experts=8, num_layers=8)
    spans = __import__("folding.cost.comm", fromlist=["group_spans"]).group_spans(spec)
    flat = dataclasses.replace(cal, routing_imbalance=0.0, layer_overhead_us=0.0, moe_overhead_us=0.0)
    skew = dataclasses.replace(flat, routing_imbalance=0.4, layer_overhead_us=10.0,
                               moe_overhead_us=100.0)
    training = TrainingSetup(seq_length=4096)
    a = StepTimeModel(MOE, training, H100_SXM, calibration=flat).layer_time(spec, spans, True, 1, "none")
    b = StepTimeModel(MOE, training, H100_SXM, calibration=skew).layer_time(spec, spans, True, 1, "none")
    assert b.ep == pytest.approx(a.ep * (1 + 0.4 * (1 - 1 / 4)))
    assert b.overhead == pytest.approx(110e-6) and a.overhead == 0
    assert b.compute > a.compute  # the busiest rank's experts get 30% more tokens
    # forced load balancing (--moe-router-force-load-balancing): no imbalance, overheads kept
    c = StepTimeModel(MOE, training, H100_SXM, calibration=skew,
                      force_balance=True).layer_time(spec, spans, True, 1, "none")
    assert (c.ep, c.compute) == (pytest.approx(a.ep), pytest.approx(a.compute))
    assert c.overhead == pytest.approx(110e-6)


def test_the_uncalibrated_model_is_the_profiles_roofline():
    raw = Calibration.from_profile(H100_SXM)
    assert (raw.gemm_efficiency, raw.attention_efficiency) == (0.75, 0.5)
    assert raw.routing_imbalance == raw.layer_overhead_us == raw.moe_overhead_us == 0


def test_fp8_is_faster_for_a_large_model_on_h100(cli):
    _, bf16, _ = cli("predict", *MIXTRAL, "--json")
    _, fp8, _ = cli("predict", *MIXTRAL, "--json", "--precision", "fp8")
    assert json.loads(fp8)["step_time_s"] < json.loads(bf16)["step_time_s"]


def test_predict_starts_without_torch():
    """What keeps `folding predict` under a second from the shell (timed by tools/bench_plan.py):
    the command imports neither torch nor Megatron, as a fresh interpreter shows."""
    code = ("import sys; from folding.cli import main; "
            "assert main(['predict', '--recipe', 'deepseek-v3', '--gpus', '1024', '--tp', '8', "
            "'--ep', '64', '--etp', '1', '--json']) == 0; "
            "print(sorted(m for m in ('torch', 'megatron', 'transformer_engine') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("extra, message", [
    (("--gpus", "100", "--tp", "2", "--pp", "8", "--ep", "8"), "not divisible"),
    (("--gpus", "128", "--gpu", "tpu-v9"), "unknown GPU"),
    (("--gpus", "128", "--tp", "2", "--pp", "8", "--ep", "8", "--precision", "fp4"), "--precision"),
    (("--gpus", "128", "--tp", "2", "--pp", "8", "--ep", "8", "--precision", "fp8",
      "--gpu", "a100-sxm-80gb"), "no FP8"),
    (("--gpus", "128", "--tp", "2", "--pp", "8", "--ep", "8", "--recompute", "sometimes"), "--recompute"),
    (("--gpus", "128", "--tp", "2", "--pp", "8", "--ep", "8", "--gbs", "100"), "global batch"),
    (("--gpus", "0",), "positive"),
])
def test_bad_input_is_one_line_and_exit_2(cli, extra, message):
    code, out, err = cli("predict", "--recipe", "mixtral-8x22b", *extra)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


def test_the_error_checker_can_fail(cli):
    """The same command with a legal folding succeeds: the error test is not vacuous."""
    code, _, err = cli("predict", "--recipe", "mixtral-8x22b", "--gpus", "128", "--tp", "2",
                       "--pp", "8", "--ep", "8")
    assert code == 0 and err == ""


def test_predict_reproduces_a_published_row_with_forced_balance(cli):
    """The Bridge's Qwen3-30B-A3B row (force-balanced, FP8) from the command line, as the
    calibration costs it."""
    from folding.cost.fit import row_model
    from folding.cost.published import ROWS

    row = next(r for r in ROWS if r.key == "bridge-qwen3-30b-a3b-fp8")
    code, out, err = cli("predict", "--recipe", row.recipe, "--gpus", str(row.gpus), "--tp", "1",
                         "--pp", "2", "--vpp", "12", "--ep", "8", "--etp", "1", "--gbs", "1024",
                         "--mbs", "1", "--precision", "fp8", "--force-balance", "--json")
    assert code == 0, err
    assert json.loads(out)["mfu"] == pytest.approx(row_model(row).mfu(FITTED), rel=1e-9)
    # the fitted imbalance is zero, so the flag's effect shows only with a skewed calibration
    r = load_recipe(row.recipe)
    skew = dataclasses.replace(FITTED, routing_imbalance=0.5)
    times = [Predictor(r.model, r.training, H100_SXM, force_balance=fb).predict(
        Predictor(r.model, r.training, H100_SXM).spec(16, 8, pp=2, ep=8, etp=1), 1, "none",
        skew, memory=False).time.total for fb in (False, True)]
    assert times[1] < times[0]
