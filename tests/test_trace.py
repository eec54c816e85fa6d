"""Routing traces: file format, validation (each refusal provoked on purpose), statistics against
hand counts, the synthetic generator's structure, and the recorder."""

import json

import numpy as np
import pytest

from folding.cli import main
from folding.errors import FoldingError
from folding.placement.recorder import TraceRecorder
from folding.placement.synth import SynthSpec, structure, synthesize
from folding.placement.trace import RoutingTrace, load_trace

# 2 layers, 3 tokens, top-2, 4 experts.
TOPK = np.array([[[0, 1], [1, 2], [0, 1]],
                 [[3, 2], [2, 0], [3, 1]]], dtype=np.int32)


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_roundtrip_with_probs(tmp_path):
    probs = np.random.default_rng(0).random(TOPK.shape).astype(np.float32)
    RoutingTrace(TOPK, 4, probs).save(tmp_path / "t.npz")
    back = load_trace(tmp_path / "t.npz")
    assert back.num_experts == 4 and back.topk.dtype == np.int32
    assert np.array_equal(back.topk, TOPK) and np.array_equal(back.probs, probs)
    assert (back.num_layers, back.num_tokens, back.top_k) == (2, 3, 2)


@pytest.mark.parametrize("arrays,message", [
    ({"topk": TOPK}, "missing key 'num_experts'"),
    ({"num_experts": np.int64(4)}, "missing key 'topk'"),
    ({"topk": TOPK, "num_experts": np.int64(3)}, "picks expert 3, outside [0, 3)"),
    ({"topk": TOPK[0], "num_experts": np.int64(4)}, "must be [layers, tokens, k]"),
    ({"topk": np.array([[[1, 1]]]), "num_experts": np.int64(4)}, "repeats an expert in its top-k [1, 1]"),
    ({"topk": TOPK.astype(float), "num_experts": np.int64(4)}, "must hold integer expert ids"),
    ({"topk": TOPK, "num_experts": np.array([4, 4])}, "num_experts must be an integer scalar"),
    ({"topk": TOPK, "num_experts": np.int64(4), "probs": np.ones((2, 3))}, "probs has shape (2, 3)"),
    ({"topk": TOPK, "num_experts": np.int64(4), "probs": np.full(TOPK.shape, np.nan)}, "finite"),
    ({"topk": -TOPK - 1, "num_experts": np.int64(4)}, "outside [0, 4)"),
    ({"topk": np.zeros((2, 0, 2), dtype=np.int32), "num_experts": np.int64(4)}, "no layers, tokens"),
    ({"topk": np.zeros((1, 1, 5), dtype=np.int32), "num_experts": np.int64(4)}, "top-k=5 is larger"),
])
def test_malformed_traces_are_refused(tmp_path, arrays, message):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(FoldingError) as error:
        load_trace(path)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_not_an_npz_and_missing_file(tmp_path):
    text = tmp_path / "trace.npz"
    text.write_text("hello")
    with pytest.raises(FoldingError, match="not a readable .npz trace"):
        load_trace(text)
    with pytest.raises(FoldingError, match="does not exist"):
        load_trace(tmp_path / "absent.npz")
    single = tmp_path / "single.npy"
    np.save(single, TOPK)
    with pytest.raises(FoldingError, match="single array"):
        load_trace(single)


def test_statistics_match_hand_counts():
    trace = RoutingTrace(TOPK, 4)
    # layer 0 picks 0,1 | 1,2 | 0,1 ; layer 1 picks 3,2 | 2,0 | 3,1
    assert trace.expert_counts().tolist() == [[2, 3, 1, 0], [1, 1, 2, 2]]
    c0 = trace.coactivation(0)
    assert c0[0, 1] == c0[1, 0] == 2 and c0[1, 2] == c0[2, 1] == 1
    assert c0.sum() == 2 * 3  # three tokens, one pair each, counted both ways
    assert np.all(np.diag(c0) == 0)
    t = trace.top1_transitions()
    assert t.shape == (1, 4, 4)
    # top-1 goes 0->3, 1->2, 0->3
    expected = np.zeros((4, 4))
    expected[0, 3], expected[1, 2] = 2, 1
    assert np.array_equal(t[0], expected)


def test_split_and_token_subsets():
    trace = RoutingTrace(np.arange(2 * 10 * 1, dtype=np.int32).reshape(2, 10, 1) % 5, 5)
    fit, score = trace.split(0.5)
    assert fit.num_tokens == 5 and score.num_tokens == 5
    assert np.array_equal(np.concatenate([fit.topk, score.topk], axis=1), trace.topk)
    with pytest.raises(FoldingError):
        trace.split(1.0)


# ----------------------------------------------------------------------------- generator
def roles_of(trace, spec):
    """The role of every (layer, token, slot), from the generator's structure."""
    roles, _ = structure(spec)
    inverse = np.argsort(roles, axis=1)
    return np.stack([inverse[l][trace.topk[l]] for l in range(spec.num_layers)])


def test_synth_is_valid_and_reproducible():
    spec = SynthSpec(32, 3, 500, 4, coactivation=0.5, affinity=0.5, group_size=8, seed=3)
    a, b = synthesize(spec), synthesize(spec)
    assert np.array_equal(a.topk, b.topk)
    assert a.topk.shape == (3, 500, 4) and a.num_experts == 32
    other = synthesize(SynthSpec(32, 3, 500, 4, coactivation=0.5, affinity=0.5, group_size=8, seed=3,
                                 token_seed=9))
    assert not np.array_equal(a.topk, other.topk)


def test_full_coactivation_keeps_each_token_inside_its_group():
    spec = SynthSpec(32, 2, 400, 4, coactivation=1.0, group_size=4)
    roles = roles_of(synthesize(spec), spec)
    groups = roles % (32 // 4)
    assert np.all(groups == groups[:, :, :1])
    # without co-activation the groups mix
    loose = SynthSpec(32, 2, 400, 4, coactivation=0.0, group_size=4)
    groups = roles_of(synthesize(loose), loose) % 8
    assert not np.all(groups == groups[:, :, :1])


def test_full_affinity_follows_the_chain():
    spec = SynthSpec(16, 4, 300, 2, affinity=1.0)
    roles = roles_of(synthesize(spec), spec)
    _, chains = structure(spec)
    for layer in range(3):
        assert np.array_equal(roles[layer + 1, :, 0], chains[layer][roles[layer, :, 0]])


def test_skew_makes_the_first_role_hot():
    spec = SynthSpec(16, 1, 4000, 1, skew=1.5)
    roles = roles_of(synthesize(spec), spec)[0, :, 0]
    counts = np.bincount(roles, minlength=16)
    assert counts[0] > 3 * counts[15]
    flat = SynthSpec(16, 1, 4000, 1, skew=0.0)
    counts = np.bincount(roles_of(synthesize(flat), flat)[0, :, 0], minlength=16)
    assert counts.max() < 2 * counts.min()


def test_drift_reassigns_the_requested_share_of_experts():
    base = structure(SynthSpec(40, 3, 1, 1))[0]
    drifted = structure(SynthSpec(40, 3, 1, 1, drift=0.25))[0]
    assert np.array_equal(structure(SynthSpec(40, 3, 1, 1, drift=0.0))[0], base)
    assert np.all((base != drifted).sum(axis=1) == 10)


@pytest.mark.parametrize("changes,message", [
    ({"group_size": 3}, "group size 3 does not divide"),
    ({"top_k": 40}, "top-k=40 is larger"),
    ({"coactivation": 1.5}, "coactivation=1.5 must lie in [0, 1]"),
    ({"skew": -1.0}, "skew=-1.0 must be >= 0"),
])
def test_synth_refuses_bad_parameters(changes, message):
    fields = dict(num_experts=32, num_layers=2, num_tokens=10, top_k=2)
    fields.update(changes)
    with pytest.raises(FoldingError) as error:
        synthesize(SynthSpec(**fields))
    assert message in str(error.value)


# ----------------------------------------------------------------------------- recorder
def test_recorder_aligns_layers_and_stops_at_max_tokens(tmp_path):
    recorder = TraceRecorder(num_experts=4, num_layers=2, max_tokens=5)
    for step in range(3):
        for layer in range(2):
            recorder.record(layer, TOPK[layer] if step != 1 else TOPK[layer][::-1])
    assert recorder.full and recorder.tokens_recorded == 5
    trace = recorder.save(tmp_path / "rec.npz")
    expected = np.concatenate([TOPK, TOPK[:, ::-1]], axis=1)[:, :5]
    assert np.array_equal(trace.topk, expected)
    assert np.array_equal(load_trace(tmp_path / "rec.npz").topk, expected)


def test_recorder_keeps_tokens_every_layer_saw():
    recorder = TraceRecorder(num_experts=4, num_layers=2)
    recorder.record(0, TOPK[0])
    recorder.record(1, TOPK[1][:2])
    assert recorder.tokens_recorded == 2 and not recorder.full
    assert np.array_equal(recorder.trace().topk, TOPK[:, :2])


def test_recorder_takes_torch_tensors_and_probs():
    torch = pytest.importorskip("torch")
    recorder = TraceRecorder(num_experts=4, num_layers=2)
    probs = torch.tensor([[0.7, 0.3]] * 3, dtype=torch.bfloat16)
    for layer in range(2):
        recorder.record(layer, torch.from_numpy(TOPK[layer].astype(np.int64)), probs)
    trace = recorder.trace()
    assert np.array_equal(trace.topk, TOPK)
    assert trace.probs.dtype == np.float32 and np.allclose(trace.probs[..., 0], 0.7, atol=1e-2)


def test_recorder_reads_megatron_routing_maps():
    recorder = TraceRecorder(num_experts=4, num_layers=1)
    routing_map = np.array([[True, False, True, False], [False, True, True, False]])
    probs = np.array([[0.2, 0.0, 0.8, 0.0], [0.0, 0.6, 0.4, 0.0]], dtype=np.float32)
    recorder.record_routing_map(0, routing_map, probs)
    trace = recorder.trace()
    assert trace.topk[0].tolist() == [[2, 0], [1, 2]]  # highest weight first
    assert np.allclose(trace.probs[0], [[0.8, 0.2], [0.6, 0.4]])
    uneven = np.array([[True, True, True, False], [False, True, True, False]])
    with pytest.raises(FoldingError, match="different numbers of experts"):
        TraceRecorder(4, 1).record_routing_map(0, uneven)


@pytest.mark.parametrize("calls,message", [
    ([(2, TOPK[0])], "layer 2 is outside [0, 2)"),
    ([(0, TOPK[0]), (1, TOPK[1][:, :1])], "top-k width 1 differs"),
    ([(0, TOPK[0] + 4)], "expert ids outside [0, 4)"),
    ([(0, TOPK[0, 0])], "expected [tokens, k]"),
])
def test_recorder_refuses_bad_input(calls, message):
    recorder = TraceRecorder(num_experts=4, num_layers=2)
    with pytest.raises(FoldingError) as error:
        for layer, ids in calls:
            recorder.record(layer, ids)
    assert message in str(error.value)


def test_recorder_refuses_mixed_probs_and_empty_layers():
    recorder = TraceRecorder(num_experts=4, num_layers=2)
    recorder.record(0, TOPK[0], np.ones((3, 2)))
    with pytest.raises(FoldingError, match="every call or none"):
        recorder.record(1, TOPK[1])
    with pytest.raises(FoldingError, match="layer 1 recorded no tokens"):
        recorder.trace()


# ----------------------------------------------------------------------------- CLI
def test_cli_synth_and_info(tmp_path, capsys):
    out = tmp_path / "s.npz"
    assert main(["trace", "synth", "--experts", "16", "--layers", "3", "--tokens", "200", "--topk", "2",
                 "--coactivation", "0.8", "--group-size", "4", "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tokens"] == 200 and summary["experts"] == 16 and summary["layers"] == 3
    assert load_trace(out).topk.shape == (3, 200, 2)
    assert main(["trace", "info", str(out)]) == 0
    assert "hottest_expert_share" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["trace", "synth", "--experts", "10", "--layers", "1", "--tokens", "5", "--topk", "2",
                 "--group-size", "4", "--out", str(tmp_path / "x.npz")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "folding trace: error: group size 4 does not divide num_experts=10"
    bad = write_npz(tmp_path / "bad.npz", topk=TOPK, num_experts=np.int64(2))
    assert main(["trace", "info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "outside [0, 2)" in err
