"""``folding place`` as a user runs it: the written placement, the side-by-side metrics, --json,
--eval, --png, --previous, --certify, and one-line errors with exit status 2."""

import json
import subprocess
import sys

import numpy as np
import pytest

from folding.cli import main
from folding.placement.metrics import evaluate
from folding.placement.placement import Placement
from folding.placement.synth import SynthSpec, synthesize
from folding.placement.trace import load_trace


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "t.npz"
    synthesize(SynthSpec(16, 3, 1500, 4, coactivation=0.9, affinity=0.8, group_size=4)).save(path)
    return path


def test_place_writes_the_chosen_placement_and_prints_all_solvers(trace_file, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["place", "--trace", str(trace_file), "--ep-size", "4", "--gpus-per-node", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("* folding", "contiguous", "eplb", "exflow", "D_gpu", "X_node", f"wrote {out}"):
        assert name in text
    placement = Placement.load(out).validate(num_experts=16, num_layers=3, ep_size=4)
    printed = next(line.split() for line in text.splitlines() if line.strip().startswith("* folding"))
    assert float(printed[3]) == pytest.approx(evaluate(placement, load_trace(trace_file)).d_gpu, abs=1e-4)


def test_place_json_and_baseline_choice(trace_file, tmp_path, capsys):
    out = tmp_path / "eplb.json"
    assert main(["place", "--trace", str(trace_file), "--ep-size", "4", "--gpus-per-node", "2",
                 "--redundant", "1", "--solver", "eplb", "--objective", "inference", "--out", str(out),
                 "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["solver"] == "eplb" and obj["objective"] == "inference" and obj["redundant"] == 1
    assert set(obj["metrics"]) == {"folding", "contiguous", "eplb", "exflow"}
    assert set(obj["metrics"]["folding"]) >= {"balance", "d_gpu", "d_node", "x_gpu", "x_node", "solve_seconds"}
    written = Placement.load(out)
    assert written.slots_per_rank == 5
    assert obj["metrics"]["eplb"]["balance"] == pytest.approx(evaluate(written, load_trace(trace_file)).balance)
    m = obj["metrics"]["folding"]
    assert obj["cost"]["folding"] == pytest.approx(m["x_gpu"] + m["x_node"])


def test_eval_png_and_score_trace(trace_file, tmp_path, capsys):
    out, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["place", "--trace", str(trace_file), "--ep-size", "4", "--out", str(out), "--png", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    other = tmp_path / "other.npz"
    synthesize(SynthSpec(16, 3, 500, 4, token_seed=8)).save(other)
    assert main(["place", "--trace", str(other), "--eval", str(out), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["metrics"]["placement"]["d_gpu"] == pytest.approx(evaluate(Placement.load(out), load_trace(other)).d_gpu)
    assert main(["place", "--trace", str(trace_file), "--eval", str(out), "--png", str(tmp_path / "e.png")]) == 0
    assert "* placement" in capsys.readouterr().out


def test_previous_limits_moves(trace_file, tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    drifted = tmp_path / "drift.npz"
    synthesize(SynthSpec(16, 3, 1500, 4, coactivation=0.9, affinity=0.8, group_size=4, drift=0.3)).save(drifted)
    assert main(["place", "--trace", str(trace_file), "--ep-size", "4", "--out", str(first)]) == 0
    assert main(["place", "--trace", str(drifted), "--ep-size", "4", "--previous", str(first),
                 "--max-moved", "0.125", "--out", str(second), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert obj["metrics"]["folding"]["moved"] <= 0.125
    assert Placement.load(second).moved_fraction(Placement.load(first)) <= 0.125


def test_certify_reports_the_milp(tmp_path, capsys):
    path = tmp_path / "small.npz"
    synthesize(SynthSpec(8, 2, 300, 2, coactivation=0.8, group_size=4)).save(path)
    assert main(["place", "--trace", str(path), "--ep-size", "4", "--gpus-per-node", "2", "--certify",
                 "--out", str(tmp_path / "p.json"), "--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["certificate"]
    assert cert["milp_optimal"] and cert["milp_bound"] <= cert["folding_cost"] + 1e-9
    assert cert["folding_above_bound"] == pytest.approx((cert["folding_cost"] - cert["milp_bound"]) / cert["milp_bound"])
    assert cert["chain_bound"] is None and cert["bound"] == cert["milp_bound"]  # training: the MILP alone


def test_certify_without_a_milp_placement_reports_the_bound(tmp_path, capsys, monkeypatch):
    from folding.placement import milp

    path = tmp_path / "small.npz"
    synthesize(SynthSpec(8, 2, 300, 2, coactivation=0.8, group_size=4)).save(path)
    monkeypatch.setattr(milp, "solve_milp", lambda *args, **kwargs: milp.MilpResult(None, float("nan"), 0.3, False, 1.0))
    argv = ["place", "--trace", str(path), "--ep-size", "4", "--gpus-per-node", "2", "--objective", "inference",
            "--certify", "--out", str(tmp_path / "p.json")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact MILP: cost none found, lower bound 0.3000 (time limit reached" in printed
    assert "chain bound: " in printed and "above the best bound" in printed
    assert main(argv + ["--json"]) == 0
    cert = json.loads(capsys.readouterr().out)["certificate"]
    assert cert["milp_cost"] is None and cert["milp_bound"] == 0.3 and not cert["milp_optimal"]
    # inference on 4^8 states: the chain bound is computed, and the larger bound counts
    assert cert["chain_bound"] <= cert["chain_placement_cost"] + 1e-12
    assert cert["bound"] == max(0.3, cert["chain_bound"])
    assert cert["folding_above_bound"] == pytest.approx((cert["folding_cost"] - cert["bound"]) / cert["bound"])


def run_in_process(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_exit_status_from_the_shell(trace_file, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "folding", "place", "--trace", str(trace_file), "--ep-size", "3",
                           "--out", str(tmp_path / "x.json")], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "folding place: error: ep_size=3 does not divide num_experts=16"


@pytest.mark.parametrize("argv,message", [
    (["--ep-size", "3", "--out", "x.json"], "ep_size=3 does not divide num_experts=16"),
    (["--out", "x.json"], "--ep-size and --out are required"),
    (["--ep-size", "4", "--out", "x.json", "--time-limit", "0"], "--time-limit must be positive"),
    (["--ep-size", "4", "--out", "x.json", "--workers", "0"], "--workers must be at least 1"),
    (["--ep-size", "4", "--out", "x.json", "--max-moved", "2"], "--max-moved must lie in [0, 1]"),
    (["--ep-size", "4", "--out", "x.json", "--solver", "exflow", "--redundant", "1"], "places no replicas"),
    (["--ep-size", "4", "--out", "x.json", "--redundant", "1", "--certify"], "--redundant 0"),
    (["--eval", "missing.json"], "cannot read placement missing.json"),
])
def test_errors_are_one_line_with_status_2(trace_file, tmp_path, capsys, argv, message):
    argv = [a if a != "x.json" else str(tmp_path / "x.json") for a in argv]
    code, out, err = run_in_process(capsys, "place", "--trace", str(trace_file), *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_bad_files_are_one_line_errors(trace_file, tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("[1, 2")
    code, _, err = run_in_process(capsys, "place", "--trace", str(trace_file), "--eval", str(bad_json))
    assert code == 2 and "is not valid JSON" in err and len(err.strip().splitlines()) == 1
    wrong = tmp_path / "wrong.json"
    Placement.identity(8, 3, 4, 2).save(wrong)
    code, _, err = run_in_process(capsys, "place", "--trace", str(trace_file), "--eval", str(wrong))
    assert code == 2 and "is for 8 experts but 16 are expected" in err
    bad_trace = tmp_path / "bad.npz"
    with open(bad_trace, "wb") as f:
        np.savez(f, topk=np.zeros((2, 3, 2), dtype=np.int32), num_experts=np.int64(4))
    code, _, err = run_in_process(capsys, "place", "--trace", str(bad_trace), "--ep-size", "2", "--out", str(tmp_path / "o.json"))
    assert code == 2 and "repeats an expert" in err
    previous = tmp_path / "prev.json"
    Placement.identity(16, 2, 4, 2).save(previous)
    code, _, err = run_in_process(capsys, "place", "--trace", str(trace_file), "--ep-size", "4", "--previous", str(previous),
                           "--out", str(tmp_path / "o.json"))
    assert code == 2 and "has 2 MoE layers but 3 are expected" in err
