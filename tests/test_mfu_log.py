"""``folding mfu`` on a Megatron log whose throughput figures Megatron computed.

tests/data/megatron_sample.log is a Megatron-format log of the mixtral-8x22b recipe on 128 GPUs;
the "throughput per GPU" figures on it were computed with megatron.training's
num_floating_point_operations (megatron-core 0.19.2) on the arguments pretrain_gpt.py parses from
``folding flags --recipe mixtral-8x22b``, then printed with one decimal as Megatron does. The
lines for iterations 90 and 100 carry figures 4/3 too high, as a Megatron build that counted the
recomputed forward pass would print them. Our recomputation must agree with Megatron's figure to
the printed rounding on every other line and flag those two.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from folding.cost.mfu_log import parse_mfu, read_log
from folding.recipe import load_recipe

LOG = Path(__file__).parent / "data" / "megatron_sample.log"
PEAK = 989.4


def printed_lines():
    text = LOG.read_text()
    return [(int(m.group(1)), float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"iteration\s+(\d+)/.*?elapsed time per iteration \(ms\): ([0-9.]+) \| "
        r"throughput per GPU \(TFLOP/s/GPU\): ([0-9.]+)", text)]


def test_recomputed_throughput_matches_megatrons_printed_figures():
    report = parse_mfu(read_log(str(LOG)), load_recipe("mixtral-8x22b"), PEAK)
    assert report.world_size == 128 and report.world_size_source == "log"
    lines = printed_lines()
    assert [i.iteration for i in report.intervals] == [it for it, _, _ in lines]
    for interval, (iteration, ms, printed) in zip(report.intervals, lines):
        assert interval.elapsed_ms == ms
        assert interval.megatron_tflops_per_gpu == printed
        if iteration < 90:
            assert abs(interval.tflops_per_gpu - printed) <= 0.05
            assert not interval.disagrees
        else:
            assert interval.disagrees
        assert interval.mfu == pytest.approx(interval.tflops_per_gpu / PEAK)


def test_the_wrong_recipe_disagrees_everywhere():
    report = parse_mfu(read_log(str(LOG)), load_recipe("qwen2-57b-a14b"), PEAK)
    assert all(i.disagrees for i in report.intervals)


def test_a_different_world_size_disagrees_and_the_override_wins():
    report = parse_mfu(read_log(str(LOG)), load_recipe("mixtral-8x22b"), PEAK, world_size=64)
    assert report.world_size_source == "--world-size"
    assert all(i.disagrees for i in report.intervals)


def test_summary_skips_the_first_interval():
    report = parse_mfu(read_log(str(LOG)), load_recipe("mixtral-8x22b"), PEAK)
    steady = sorted(i.tflops_per_gpu for i in report.intervals[1:])
    assert report.summary()["median_tflops_per_gpu"] == pytest.approx(
        (steady[4] + steady[5]) / 2)
    assert report.summary()["disagreements"] == 2


def test_other_conventions_are_labelled_and_differ():
    recipe = load_recipe("mixtral-8x22b")
    megatron = parse_mfu(read_log(str(LOG)), recipe, PEAK)
    palm = parse_mfu(read_log(str(LOG)), recipe, PEAK, convention="palm")
    assert palm.to_json()["convention_label"].startswith("PaLM")
    assert palm.intervals[3].tflops_per_gpu != megatron.intervals[3].tflops_per_gpu



def test_cli_json_and_png(tmp_path, cli):
    png = tmp_path / "mfu.png"
    code, out, err = cli("mfu", str(LOG), "--recipe", "mixtral-8x22b", "--json",
                             "--png", str(png))
    assert code == 0, err
    data = json.loads(out)
    assert data["summary"]["disagreements"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code, out, _ = cli("mfu", str(LOG), "--recipe", "mixtral-8x22b", "--peak-tflops", "1000")
    assert code == 0 and "DISAGREES" in out and "peak 1000" in out


def test_cli_errors_are_one_line(tmp_path, cli):
    code, _, err = cli("mfu", str(tmp_path / "nope.log"), "--recipe", "mixtral-8x22b")
    assert code == 2 and err.count("\n") == 1
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    code, _, err = cli("mfu", str(empty), "--recipe", "mixtral-8x22b")
    assert code == 2 and "no Megatron iteration lines" in err
