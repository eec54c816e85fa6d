"""``folding mesh`` as a user runs it: table, JSON, PNG, and one-line errors."""

import json
import subprocess
import sys

import pytest

from folding.cli import main
from folding.mesh import FoldingSpec


def run_cli(*argv):
    proc = subprocess.run([sys.executable, "-m", "folding", *argv], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def test_table_and_report(capsys):
    assert main(["mesh", "--world-size", "16", "--tp", "2", "--ep", "16", "--etp", "1"]) == 0
    out = capsys.readouterr().out
    assert "TP2 CP1 DP8 PP1 | ETP1 EP16 EDP1" in out
    assert "EP group spans 2 nodes: the all-to-all crosses the network" in out
    lines = [l.split() for l in out.splitlines() if l.strip()[:2].strip().isdigit()]
    # rank 9: node 1, attention (tp1, cp0, dp4, pp0), moe (etp0, ep9, edp0, pp0)
    assert ["9", "1", "1", "0", "4", "0", "|", "0", "9", "0", "0"] in lines


def test_json_matches_mesh(capsys):
    assert main(["mesh", "--world-size", "128", "--tp", "2", "--pp", "8", "--ep", "8", "--etp", "1",
                 "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    spec = FoldingSpec(world_size=128, tp=2, pp=8, ep=8, etp=1)
    assert set(obj) == {"attention", "moe", "nodes"}
    assert set(obj["attention"]) == {"tp", "cp", "dp", "pp", "tp_cp", "dp_cp"}
    assert set(obj["moe"]) == {"etp", "ep", "edp", "etp_ep"}
    assert obj["attention"] == spec.rank_groups()["attention"]
    assert obj["moe"]["ep"][0] == list(range(8))
    assert obj["nodes"] == [r // 8 for r in range(128)]


def test_png(tmp_path, capsys):
    out = tmp_path / "mesh.png"
    assert main(["mesh", "--world-size", "8", "--tp", "2", "--ep", "4", "--etp", "1", "--png", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,message", [
    (["--world-size", "48", "--ep", "6", "--etp", "1", "--num-experts", "8"], "EP=6 does not divide num_experts=8"),
    (["--world-size", "8", "--tp", "3"], "is not divisible by TP=3"),
    (["--world-size", "8", "--tp", "two"], "argument --tp: invalid int value"),
    (["--world-size", "8", "--ep", "2", "--order", "tp-dp"], "leaves out 'ep'"),
])
def test_invalid_input_one_line_exit_2(argv, message):
    code, out, err = run_cli("mesh", *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err
    assert "Traceback" not in err
