"""``folding trace import``: Megatron-Core 0.19's router-trace JSONL to a .npz routing trace."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from folding.errors import FoldingError
from folding.placement.megatron_trace import import_megatron_trace
from folding.placement.trace import load_trace

DATA = Path(__file__).parent / "data"
FIXTURE = DATA / "megatron_router_trace.jsonl"

_spec = importlib.util.spec_from_file_location("make_megatron_router_trace",
                                               DATA / "make_megatron_router_trace.py")
gen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen)


def _router_trace_module():
    return pytest.importorskip(
        "megatron.core.transformer.moe.router_trace",
        reason="megatron-core 0.16.1 has no router tracer (the megatron-core 0.19.2 job runs this)")


# ------------------------------------------------------------------ (a) Megatron's own tracer
@pytest.mark.megatron
def test_megatron_tracer_output_imports_exactly(tmp_path, cli):
    _router_trace_module()
    events = gen.routing_events(seed=3)
    jsonl = gen.write_trace(str(tmp_path / "trace"), events)
    out = tmp_path / "t.npz"
    code, stdout, err = cli("trace", "import", str(jsonl), "--experts", str(gen.EXPERTS),
                            "--out", str(out), "--json")
    assert code == 0, err
    facts = json.loads(stdout)
    assert facts["dropped_records"] == 7 and facts["dropped_tokens"] == 8
    assert facts["skipped_mtp_records"] == 1 and facts["layer_ids"] == list(gen.LAYERS)
    trace = load_trace(out)
    assert trace.num_experts == gen.EXPERTS
    np.testing.assert_array_equal(trace.topk, gen.expected_topk(events))


@pytest.mark.megatron
def test_committed_fixture_is_what_megatron_writes(tmp_path):
    _router_trace_module()
    jsonl = gen.write_trace(str(tmp_path), gen.routing_events())
    assert jsonl.read_text() == FIXTURE.read_text()


# ------------------------------------------------------------------ (b) the committed fixture
def test_fixture_imports_to_the_fed_routing():
    trace, report = import_megatron_trace(FIXTURE)
    np.testing.assert_array_equal(trace.topk, gen.expected_topk(gen.routing_events()))
    assert trace.num_experts == gen.EXPERTS and report.experts_inferred
    assert (report.records, report.groups, report.steps) == (19, 3, 2)
    assert (report.dropped_records, report.dropped_tokens, report.skipped_mtp_records) == (7, 8, 1)


def test_several_files_concatenate_and_must_share_layers(tmp_path):
    other = tmp_path / "router_trace_rank1.jsonl"
    other.write_text(FIXTURE.read_text())
    trace, report = import_megatron_trace([FIXTURE, other], num_experts=20)
    expected = gen.expected_topk(gen.routing_events())
    np.testing.assert_array_equal(trace.topk, np.concatenate([expected, expected], axis=1))
    assert trace.num_experts == 20 and report.dropped_records == 14
    stage = tmp_path / "stage.jsonl"
    stage.write_text("".join(line for line in FIXTURE.read_text().splitlines(True)
                             if '"layer": 3' not in line))
    with pytest.raises(FoldingError, match="holds layers"):
        import_megatron_trace([FIXTURE, stage])


def test_logit_shape_sets_the_expert_count(tmp_path):
    record = {"step": 0, "block": "decoder", "layer": 0, "rank": 0, "num_tokens": 1, "topk": 1,
              "top_indices": [[2]], "logit_shape": [1, 8]}
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(record) + "\n")
    trace, report = import_megatron_trace(path)
    assert trace.num_experts == 8 and not report.experts_inferred
    path.write_text(json.dumps(record) + "\n" + json.dumps({**record, "logit_shape": [1, 9]}) + "\n")
    with pytest.raises(FoldingError, match=r"r\.jsonl:2: logit_shape gives 9 experts"):
        import_megatron_trace(path)


# ------------------------------------------------------------------ (c) round trip
def test_import_info_place_round_trip(tmp_path, cli):
    out = tmp_path / "imported.npz"
    code, stdout, err = cli("trace", "import", str(FIXTURE), "--experts", "16", "--out", str(out))
    assert code == 0, err
    assert "dropped 7 records (8 tokens)" in stdout
    code, stdout, err = cli("trace", "info", str(out), "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert (info["layers"], info["tokens"], info["topk"], info["experts"]) == (4, 17, 2, 16)
    placement = tmp_path / "placement.json"
    code, stdout, err = cli("place", "--trace", str(out), "--ep-size", "4", "--gpus-per-node", "2",
                            "--out", str(placement))
    assert code == 0, err
    assert placement.is_file()


# ------------------------------------------------------------------ (d) broken input
def _lines():
    return FIXTURE.read_text().splitlines(True)


@pytest.mark.parametrize("mutate, line, message", [
    (lambda ls: ls[:6] + [ls[6][:40] + "\n"] + ls[7:], 7, "not a JSON line"),
    (lambda ls: ls[:-1] + [ls[-1][:-30]], 20, "not a JSON line"),
    (lambda ls: ls[:2] + [ls[2].replace('"topk": 2, "top_indices": [[0, 4],',
                                        '"topk": 3, "top_indices": [[0, 4, 9],')] + ls[3:], 3,
     "top-k 3 differs from top-k 2"),
    (lambda ls: ls[:1] + [ls[1].replace('"num_tokens": 6, ', '')] + ls[2:], 2, "lacks 'num_tokens'"),
    (lambda ls: ls[:3] + [ls[3].replace("[[1, 4]", "[[1, 1]")] + ls[4:], 4, "repeats an expert"),
    (lambda ls: ls[:3] + [ls[3].replace("[[1, 4]", "[[1, 40]")] + ls[4:], 4, "outside"),
    (lambda ls: ["[1, 2]\n"] + ls, 1, "not a router-trace record"),
])
def test_broken_files_fail_with_one_line_naming_the_line(tmp_path, cli, mutate, line, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(mutate(_lines())))
    code, stdout, err = cli("trace", "import", str(bad), "--experts", "16", "--out", str(tmp_path / "o.npz"))
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1
    assert f"{bad}:{line}:" in err and message in err
    assert not (tmp_path / "o.npz").exists()


def test_not_jsonl_at_all(tmp_path, cli):
    bad = tmp_path / "trace.npz"
    bad.write_bytes(b"PK\x03\x04\x00\x00binary")
    code, _, err = cli("trace", "import", str(bad), "--out", str(tmp_path / "o.npz"))
    assert code == 2 and f"{bad}:1:" in err and len(err.strip().splitlines()) == 1


def test_nothing_aligned_is_an_error(tmp_path, cli):
    only = tmp_path / "partial.jsonl"
    lines = _lines()
    only.write_text(lines[0] + lines[5] + lines[6])  # layer 0 twice and layer 1 once in step 5
    code, _, err = cli("trace", "import", str(only), "--out", str(tmp_path / "o.npz"))
    assert code == 2 and "no token could be aligned" in err


def test_a_record_missing_mid_step_drops_that_whole_step(tmp_path):
    path = tmp_path / "gap.jsonl"
    lines = _lines()
    path.write_text("".join(lines[:2] + lines[3:]))  # step 5, first micro-batch, layer 2 missing
    trace, report = import_megatron_trace(path)
    events = gen.routing_events()
    np.testing.assert_array_equal(trace.topk, gen.expected_topk(events)[:, 10:])  # step 7 only
    assert (report.steps, report.dropped_records, report.dropped_tokens) == (1, 7 + 7, 10 + 8)
