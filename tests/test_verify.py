"""folding verify: every required folding trains exactly like a single process, and the checker
fails when the folded run is deliberately broken."""

import json
import subprocess
import sys

import pytest

from folding.layout.parameters import full_parameters
from folding.megatron.model import MoERouting
from folding.mesh import FoldingSpec
from folding.recipe import load_recipe
from folding.run.verify import VerifyCase, verify_many

# One module fixture spawns every case; the limit is for a hang, not for a slow machine.
pytestmark = [pytest.mark.megatron, pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(1800)]

FOLDINGS = {
    "TP2 DP4 | ETP1 EP4 EDP2": dict(tp=2, ep=4, etp=1),
    "TP1 DP8 | EP8": dict(tp=1, ep=8),
    "TP4 DP2 | ETP2 EP2 EDP2": dict(tp=4, ep=2, etp=2),
    "TP2 DP4 | ETP2 EP4 EDP1": dict(tp=2, ep=4, etp=2),
    "TP2 PP2 DP2 | ETP1 EP4": dict(tp=2, pp=2, ep=4, etp=1),
    "TP2 PP2 VPP2 DP2 | ETP2 EP2": dict(tp=2, pp=2, vpp=2, ep=2, etp=2),
}
DROPPING = {
    "probs": dict(capacity_factor=1.0, drop_policy="probs"),
    "probs padded": dict(capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True),
    "position": dict(capacity_factor=1.0, drop_policy="position"),
    "position padded": dict(capacity_factor=1.0, drop_policy="position", pad_to_capacity=True),
}
FAULTS = {
    "skip-expert-dp-reduce": (dict(tp=2, ep=4, etp=1), {}),
    "skip-tp-norm-reduce": (dict(tp=2, ep=4, etp=1), {}),
    "halve-capacity": (dict(tp=2, ep=4, etp=1), dict(capacity_factor=1.0)),
}


def spec(degrees):
    return FoldingSpec(world_size=8, num_experts=8, num_layers=4, **degrees)


@pytest.fixture(scope="module")
def reports(request):
    """The cases of the selected tests in one reference run and one 8-rank spawn: process
    start-up dominates."""
    cases = {}
    for name, degrees in FOLDINGS.items():
        for dispatcher in ("alltoall", "allgather"):
            cases[(name, dispatcher)] = VerifyCase(spec(degrees), MoERouting(dispatcher=dispatcher))
    for name, routing in DROPPING.items():
        for folding in ("TP2 DP4 | ETP1 EP4 EDP2", "TP2 DP4 | ETP2 EP4 EDP1"):
            cases[(folding, name)] = VerifyCase(spec(FOLDINGS[folding]), MoERouting(**routing))
    for fault, (degrees, routing) in FAULTS.items():
        cases[("fault", fault)] = VerifyCase(spec(degrees), MoERouting(**routing), fault=fault)
    selected = _selected_keys(request.session.items)
    keys = [k for k in cases if k in selected]
    return dict(zip(keys, verify_many([cases[k] for k in keys])))


def _selected_keys(items):
    """The ``reports`` keys the selected tests of this module read (``-k``, ``-m`` and the
    megatron-core 0.19.2 pass select fewer)."""
    keys = set()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module.__name__ != __name__ or not params:
            continue
        if "fault" in params:
            keys.add(("fault", params["fault"]))
        else:
            keys.add((params["folding"], params.get("dispatcher", params.get("mode"))))
    return keys


# On megatron-core 0.19.2 the alltoall dispatcher runs every folding; the allgather dispatcher,
# token dropping and the broken runs (the plugin's own checks, proven on 0.16.1) add nothing
# there that test_dispatcher's comparisons with Megatron's dispatchers do not.
@pytest.mark.parametrize("dispatcher", ["alltoall", pytest.param("allgather", marks=pytest.mark.primary_only)])
@pytest.mark.parametrize("folding", list(FOLDINGS))
def test_dropless_folding_equals_single_process(reports, folding, dispatcher):
    report = reports[(folding, dispatcher)]
    assert report.passed, report.to_json()
    assert report.max_loss_rel_diff <= 1e-5
    assert report.max_grad_rel_diff <= 1e-4 and report.max_param_rel_diff <= 1e-4
    # Every parameter of the model was compared at every step.
    every = set(full_parameters(load_recipe("tiny-moe").model))
    assert len(report.steps) == 3
    assert all(set(s.grad_rel_diff) == every == set(s.param_rel_diff) for s in report.steps)


@pytest.mark.primary_only
@pytest.mark.parametrize("folding", ["TP2 DP4 | ETP1 EP4 EDP2", "TP2 DP4 | ETP2 EP4 EDP1"])
@pytest.mark.parametrize("mode", list(DROPPING))
def test_token_dropping_equals_single_process(reports, folding, mode):
    report = reports[(folding, mode)]
    assert report.passed, report.to_json()
    # Every router call of every rank: 3 steps x 4 layers x 2 micro-batches x 8 ranks.
    assert report.drops.compared == 3 * 4 * 2 * 8 and not report.drops.mismatches


@pytest.mark.primary_only
@pytest.mark.parametrize("fault", list(FAULTS))
def test_checker_fails_on_a_broken_run(reports, fault):
    report = reports[("fault", fault)]
    assert not report.passed
    if fault == "halve-capacity":
        assert report.drops.mismatches  # decisions differ, gradients replayed
    else:
        assert report.max_grad_rel_diff > 1e-2


@pytest.mark.smoke
@pytest.mark.primary_only
def test_cli_refuses_a_sequence_cp_cannot_split_and_reports_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "folding", "verify", "--tp", "2", "--cp", "2",
                           "--ep", "4", "--etp", "1", "--seq-len", "36"], capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "folding verify: error: seq-len=36 is not divisible by 2 x CP x TP = 2 x 2 x 2 = 8 "
        "(Megatron's load-balanced context-parallel split with sequence parallel)"]
    proc = subprocess.run([sys.executable, "-m", "folding", "verify", "--world-size", "4", "--tp", "2",
                           "--ep", "2", "--etp", "1", "--steps", "2", "--json"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert set(out) >= {"folding", "steps", "max_loss_rel_diff", "max_grad_rel_diff",
                        "max_param_rel_diff", "passed"}
    assert out["passed"] is True and out["steps"] == 2 and out["folding"]["ep"] == 2
