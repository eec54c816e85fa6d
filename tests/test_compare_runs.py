"""tools/compare_runs.py on pairs of Megatron logs, and tools/gpu_check.sh without a GPU.

The logs are written with training_log's format strings (megatron-core 0.19.2): a reference run
A, and runs B within the tolerance, beyond it at one iteration, missing an iteration, or not a
log at all. Timing figures are fixed numbers in the logs, never measured. gpu_check.sh is checked
for syntax, --help and its refusal without MEGATRON_LM, then run end to end with stand-ins for
torchrun, nvidia-smi, folding and Transformer Engine that write logs instead of training: both
runs must get the same flags (the folding flags added to B only), and the script must end with
compare_runs.py's verdict and exit status.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "compare_runs.py"
GPU_CHECK = ROOT / "tools" / "gpu_check.sh"


def _load_tool():
    spec = importlib.util.spec_from_file_location("compare_runs", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare_runs = _load_tool()


def iteration_line(iteration, train_iters, lm_loss, lb_loss, elapsed_ms, batch=8):
    """training_log's line (megatron/training/training.py), its format strings in its order."""
    s = f" [{datetime(2026, 12, 6, 5, 0, iteration % 60).strftime('%Y-%m-%d %H:%M:%S.%f')}]"
    s += ' iteration {:8d}/{:8d} |'.format(iteration, train_iters)
    s += ' consumed samples: {:12d} |'.format(iteration * batch)
    s += ' elapsed time per iteration (ms): {:.1f} |'.format(elapsed_ms)
    s += f' throughput per GPU (TFLOP/s/GPU): {1.0:.1f} |'
    s += f' learning rate: {1e-4:.6E} |'
    s += f' global batch size: {batch:5d} |'
    for key, avg in (("lm loss", lm_loss), ("load_balancing_loss", lb_loss)):
        s += ' {}: {:.6E} |'.format(key, avg)
    s += f' loss scale: {1.0:.1f} |'
    s += f' grad norm: {2.5:.3f} |'
    s += ' number of skipped iterations: {:3d} |'.format(0)
    s += ' number of nan iterations: {:3d} |'.format(0)
    return s


ITERS = 20


def lm_loss(i):
    return 10.4 - 0.21 * i


def lb_loss(i):
    return 1.0 + 0.5 / i


def write_log(path, iterations=range(1, ITERS + 1), loss_scale=1.0, elapsed=400.0,
              startup=(9000.0, 1500.0), overrides=None):
    """A Megatron log with start-up noise; iterations 1 and 2 take ``startup`` ms."""
    overrides = overrides or {}
    lines = ["using world size: 8, data-parallel size: 4, tensor-model-parallel size: 2",
             "[before the start of training step] datetime: 2026-12-06 04:59:50"]
    for i in iterations:
        ms = startup[i - 1] if i <= len(startup) else elapsed
        lm, lb = overrides.get(i, (lm_loss(i) * loss_scale, lb_loss(i) * loss_scale))
        lines.append(iteration_line(i, ITERS, lm, lb, ms))
    lines.append(f"saving checkpoint at iteration {ITERS:7d} to /ckpt in torch_dist format")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_tool(capsys, *args):
    code = compare_runs.main([str(a) for a in args])
    out = capsys.readouterr().out.strip().splitlines()
    return code, out, json.loads(out[-1])


def test_within_tolerance(tmp_path, capsys):
    a = write_log(tmp_path / "a.log")
    b = write_log(tmp_path / "b.log", loss_scale=1 + 4e-4, elapsed=500.0, startup=(100.0, 100.0))
    code, out, result = run_tool(capsys, a, b, "--rtol", "1e-3")
    assert code == 0 and out[-2] == "PASS"
    assert result["ok"] and result["within_rtol"] and result["iterations_compared"] == ITERS
    assert list(result["losses"]) == ["lm loss", "load_balancing_loss"]
    for loss in result["losses"].values():
        assert loss["within_rtol"] and 3.9e-4 < loss["max_rel_diff"] < 4.1e-4
    assert [row["iteration"] for row in result["per_iteration"]] == list(range(1, ITERS + 1))
    # start-up iterations 1 and 2 are left out, so the ratio is the steady one
    time = result["iteration_time"]
    assert (time["first"], time["last"], time["iterations"]) == (3, ITERS, ITERS - 2)
    assert (time["mean_ms_a"], time["mean_ms_b"]) == (400.0, 500.0)
    assert time["ratio_b_over_a"] == pytest.approx(1.25)
    code, _, result = run_tool(capsys, a, b, "--skip-first", "0")
    assert result["iteration_time"]["ratio_b_over_a"] < 1  # start-up now dominates
    code, out, result = run_tool(capsys, a, b, "--json")
    assert code == 0 and len(out) == 1 and result["ok"]


def test_one_loss_beyond_tolerance(tmp_path, capsys):
    a = write_log(tmp_path / "a.log")
    b = write_log(tmp_path / "b.log", overrides={13: (lm_loss(13) * (1 + 2e-3), lb_loss(13))})
    code, out, result = run_tool(capsys, a, b)
    assert code == 1 and out[-2] == "FAIL" and not result["ok"] and not result["within_rtol"]
    lm, lb = result["losses"]["lm loss"], result["losses"]["load_balancing_loss"]
    assert not lm["within_rtol"] and lm["at_iteration"] == 13
    assert lm["max_rel_diff"] == pytest.approx(2e-3 / (1 + 2e-3), rel=1e-3)
    assert lb["within_rtol"] and lb["max_rel_diff"] == 0.0
    assert "lm loss: max rel diff 2.00e-03 at iteration 13: BEYOND rtol 0.001" in out
    # a looser tolerance passes the same pair
    code, _, result = run_tool(capsys, a, b, "--rtol", "3e-3")
    assert code == 0 and result["ok"]


def test_a_missing_iteration(tmp_path, capsys):
    a = write_log(tmp_path / "a.log")
    b = write_log(tmp_path / "b.log", iterations=[i for i in range(1, ITERS + 1) if i != 7])
    code, out, result = run_tool(capsys, a, b)
    assert code == 1 and not result["ok"]
    assert result["within_rtol"]  # the losses it has agree; the gap alone fails the pair
    assert (result["missing_in_a"], result["missing_in_b"]) == ([], [7])
    assert "iterations missing in B: [7]" in out
    code, _, result = run_tool(capsys, b, a)
    assert code == 1 and result["missing_in_a"] == [7]


def test_a_loss_only_one_log_prints_fails(tmp_path, capsys):
    a = write_log(tmp_path / "a.log")
    b_path = tmp_path / "b.log"
    write_log(b_path)
    text = b_path.read_text().replace(" load_balancing_loss: 1.500000E+00 |", "")
    b_path.write_text(text)
    code, _, result = run_tool(capsys, a, b_path)
    assert code == 1 and result["losses"]["load_balancing_loss"]["only_in_a"] == [1]


def test_a_resumed_log_counts_the_later_lines(tmp_path, capsys):
    a = write_log(tmp_path / "a.log")
    b_path = tmp_path / "b.log"
    write_log(b_path, overrides={5: (99.0, 99.0)})
    resumed = write_log(tmp_path / "resumed.log", iterations=range(5, ITERS + 1))
    b_path.write_text(b_path.read_text() + Path(resumed).read_text())
    code, _, result = run_tool(capsys, a, b_path)
    assert code == 0 and result["repeated_in_b"] == list(range(5, ITERS + 1))


def test_bad_input_exits_2(tmp_path, capsys):
    a = write_log(tmp_path / "a.log")
    empty = tmp_path / "empty.log"
    empty.write_text("Traceback (most recent call last):\nRuntimeError: NCCL error\n")
    for bad, message in ((tmp_path / "absent.log", "cannot read log"),
                         (tmp_path, "cannot read log"),
                         (empty, "no Megatron iteration lines")):
        code = compare_runs.main([a, str(bad)])
        captured = capsys.readouterr()
        assert code == 2 and captured.err.count("\n") == 1 and message in captured.err
        assert json.loads(captured.out.strip().splitlines()[-1]) == {
            "ok": False, "error": captured.err.strip().removeprefix("error: ")}


def test_the_exit_status_from_the_shell(tmp_path):
    a = write_log(tmp_path / "a.log")
    b = write_log(tmp_path / "b.log", loss_scale=1.01)
    codes = [subprocess.run([sys.executable, str(TOOL), a, other, "--json"], capture_output=True,
                            text=True, cwd=tmp_path).returncode
             for other in (a, b, str(tmp_path / "absent.log"))]
    assert codes == [0, 1, 2]


# ----------------------------------------------------------------------------- gpu_check.sh


def test_gpu_check_syntax_help_and_missing_megatron():
    assert subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True).returncode == 0
    help_ = subprocess.run(["bash", str(GPU_CHECK), "--help"], capture_output=True, text=True)
    assert help_.returncode == 0
    assert "MEGATRON_LM" in help_.stdout and "compare_runs.py" in help_.stdout
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_LM"}
    run = subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "MEGATRON_LM is not set" in run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["ok"] is False


# Stand-ins: torchrun records its arguments (one a line, then a separator) and prints the log
# prepared for that run (B: the one with the folding flags); nvidia-smi lists 8 GPUs.
FAKE_TORCHRUN = """#!/bin/sh
for a in "$@"; do printf '%s\\n' "$a"; done >>"$CALLS"
echo "--end of call--" >>"$CALLS"
case " $* " in
    *" --folding-dispatcher "*) cat "$LOG_B" ;;
    *) cat "$LOG_A" ;;
esac
"""
FAKE_NVIDIA_SMI = """#!/bin/sh
[ "$1" = "-L" ] || exit 0
for i in 0 1 2 3 4 5 6 7; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; done
"""


@pytest.fixture
def fake_gpu_machine(tmp_path):
    bin_dir, megatron = tmp_path / "bin", tmp_path / "Megatron-LM"
    bin_dir.mkdir()
    (megatron / "transformer_engine").mkdir(parents=True)
    (megatron / "pretrain_gpt.py").write_text("raise SystemExit('not run here')\n")
    (megatron / "transformer_engine" / "__init__.py").write_text("")
    (megatron / "transformer_engine" / "pytorch.py").write_text("")
    for name, text in (("torchrun", FAKE_TORCHRUN), ("nvidia-smi", FAKE_NVIDIA_SMI),
                       ("folding", "#!/bin/sh\nexit 3\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if k not in ("NPROC", "TP", "EP", "PP", "ETP", "MBS", "GBS", "ITERS", "PYTHON")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", MEGATRON_LM=str(megatron),
               OUT=str(tmp_path / "out"), CALLS=str(tmp_path / "calls"), JOBS_CHECK="0",
               LAYER_CHECK="0",
               LOG_A=write_log(tmp_path / "stock.log"), LOG_B=str(tmp_path / "folded.log"))
    write_log(tmp_path / "folded.log")
    return tmp_path, env


def calls(tmp_path):
    return [c.strip("\n").split("\n")
            for c in (tmp_path / "calls").read_text().split("--end of call--\n") if c]


def _run_gpu_check(env):
    return subprocess.run(["bash", str(GPU_CHECK)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow  # the script's environment report imports torch and Megatron-Core
def test_gpu_check_runs_both_and_reports_the_comparison(fake_gpu_machine):
    tmp_path, env = fake_gpu_machine
    run = _run_gpu_check(env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["ok"] is True
    stock, folded = calls(tmp_path)
    assert stock[:3] == ["--standalone", "--nproc-per-node", "8"]
    script = str(tmp_path / "Megatron-LM" / "pretrain_gpt.py")
    flags = stock[stock.index(script) + 1:]
    assert folded[:folded.index(script) + 1] == ["--standalone", "--nproc-per-node", "8",
                                                 "--no-python", "folding", "megatron", "--", script]
    assert folded[folded.index(script) + 1:] == flags + [
        "--folding-check-mesh", "--folding-dispatcher", "--folding-gpus-per-node", "8"]
    # 8 GPUs: TP2 EP4 (with sequence parallelism), alltoall, TE, SequentialMLP experts
    value = {f: flags[flags.index(f) + 1] for f in (
        "--tensor-model-parallel-size", "--expert-model-parallel-size", "--num-experts",
        "--moe-router-topk", "--moe-token-dispatcher-type", "--transformer-impl", "--seed",
        "--seq-length", "--hidden-size", "--num-layers")}
    assert value == {"--tensor-model-parallel-size": "2", "--expert-model-parallel-size": "4",
                     "--num-experts": "8", "--moe-router-topk": "2",
                     "--moe-token-dispatcher-type": "alltoall",
                     "--transformer-impl": "transformer_engine", "--seed": "1234",
                     "--seq-length": "1024", "--hidden-size": "512", "--num-layers": "4"}
    assert {"--sequence-parallel", "--bf16", "--mock-data"} <= set(flags)
    assert "--moe-grouped-gemm" not in flags
    out = tmp_path / "out"
    assert {"a.log", "b.log", "compare.txt", "compare.json", "env.txt"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "compare.json").read_text())["iterations_compared"] == ITERS
    assert "NPROC=8 TP=2 PP=1 EP=4" in (out / "env.txt").read_text()


@pytest.mark.slow  # the script's environment report imports torch and Megatron-Core
def test_gpu_check_fails_when_its_own_jobs_or_the_layer_check_fail(fake_gpu_machine):
    tmp_path, env = fake_gpu_machine
    env.update(JOBS_CHECK="1", LAYER_CHECK="1")  # the stand-in folding exits 3; no CUDA here
    run = _run_gpu_check(env)
    assert run.returncode == 1, run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["ok"] is False and result["jobs_failed"] == ["train", "verify"]
    assert result["iterations_compared"] == ITERS  # the comparison itself passed
    assert "folding train --device cuda" in run.stdout.replace(env["PATH"].split(os.pathsep)[0] + "/", "")


@pytest.mark.slow  # the script's environment report imports torch and Megatron-Core
def test_gpu_check_fails_with_the_comparison_and_defaults_to_one_gpu(fake_gpu_machine):
    tmp_path, env = fake_gpu_machine
    write_log(tmp_path / "folded.log", loss_scale=1.01, elapsed=404.0)
    env.update(NPROC="1")
    run = _run_gpu_check(env)
    assert run.returncode == 1 and "FAIL" in run.stdout
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert not result["ok"] and result["iteration_time"]["ratio_b_over_a"] == pytest.approx(1.01)
    stock, _ = calls(tmp_path)
    assert stock[stock.index("--tensor-model-parallel-size") + 1] == "1"
    assert stock[stock.index("--expert-model-parallel-size") + 1] == "1"
    assert "--sequence-parallel" not in stock
