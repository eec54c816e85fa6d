"""folding verify with context parallelism (no Transformer Engine): each CP comm type, on the
issue's six foldings, with both of Megatron's dispatchers and the folded one, dropless and
dropping at capacity factor 1.0, trains exactly like a single process; skipping the CP part of
the gradient reduction fails the checker.

CI runs a cover of the matrix (every folding, every mode at least twice, every dispatcher,
dropless and dropping) in one spawn; ``make test-long`` (FOLDING_LONG_TESTS=1) runs all of it.
"""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from folding.megatron.model import MoERouting
from folding.mesh import FoldingSpec
from folding.run.verify import LOSS_TOLERANCE, TENSOR_TOLERANCE, VerifyCase, verify_many

# megatron-core 0.16.1 in CI; `make test-long` runs the whole matrix on 0.19.2 (CI time on 2
# cores is the limit; the 0.19-specific batch split is in tests/test_context_parallel_attention.py).
pytestmark = [pytest.mark.multiprocess, pytest.mark.slow, pytest.mark.timeout(3600)]

# One key/value head per attention head: a2a can scatter its groups over CP 8.
MHA_RECIPE = str(Path(__file__).parent / "data" / "tiny-moe-mha.yaml")
TINY = dict(num_experts=8, num_layers=4, num_attention_heads=8, num_query_groups=4)
MHA = dict(TINY, num_query_groups=8)

FOLDINGS = {
    "TP1 CP2 DP4 | ETP1 EP8": dict(tp=1, cp=2, ep=8, etp=1),
    "TP2 CP2 DP2 | ETP1 EP8": dict(tp=2, cp=2, ep=8, etp=1),
    "TP1 CP2 PP2 DP2 | ETP1 EP4": dict(tp=1, cp=2, pp=2, ep=4, etp=1),
    "TP2 CP2 PP2 | ETP2 EP2": dict(tp=2, cp=2, pp=2, ep=2, etp=2),
    "CP4 DP2 | EP4 EDP2": dict(tp=1, cp=4, ep=4, etp=1),
    "CP8 | EP8": dict(tp=1, cp=8, ep=8, etp=1),
}
MODES = ("p2p", "all_gather", "a2a")
DISPATCHERS = ("alltoall", "allgather", "folded")
CAPACITY = {"dropless": None, "capacity 1.0": 1.0}

# Every folding, each mode at least twice, each dispatcher, dropless and dropping.
COVER = [
    ("TP1 CP2 DP4 | ETP1 EP8", "p2p", "alltoall", "dropless"),
    ("TP2 CP2 DP2 | ETP1 EP8", "all_gather", "allgather", "capacity 1.0"),
    ("TP1 CP2 PP2 DP2 | ETP1 EP4", "a2a", "folded", "dropless"),
    ("TP2 CP2 PP2 | ETP2 EP2", "p2p", "alltoall", "capacity 1.0"),
    ("CP4 DP2 | EP4 EDP2", "all_gather", "folded", "capacity 1.0"),
    ("CP4 DP2 | EP4 EDP2", "a2a", "allgather", "dropless"),
    ("CP8 | EP8", "p2p", "allgather", "dropless"),
    ("CP8 | EP8", "a2a", "folded", "capacity 1.0"),
]


def _case(folding, mode, dispatcher, capacity, fault=None) -> VerifyCase:
    # tiny-moe's 4 query groups do not divide over CP 8: a2a runs there on the MHA variant.
    a2a_cp8 = mode == "a2a" and FOLDINGS[folding]["cp"] == 8
    spec = FoldingSpec(world_size=8, cp_comm_type=mode, **FOLDINGS[folding],
                       **(MHA if a2a_cp8 else TINY))
    return VerifyCase(spec, MoERouting(dispatcher=dispatcher, capacity_factor=CAPACITY[capacity]),
                      recipe=MHA_RECIPE if a2a_cp8 else "tiny-moe", steps=2, seq_len=32,
                      fault=fault)


def _selected():
    if os.environ.get("FOLDING_LONG_TESTS"):
        return list(itertools.product(FOLDINGS, MODES, DISPATCHERS, CAPACITY))
    return COVER


@pytest.fixture(scope="module")
def reports():
    """Every case in one reference run and one 8-rank spawn, plus the fault."""
    keys = _selected() + [("fault",)]
    cases = [_case(*k) for k in keys[:-1]]
    cases.append(_case("TP1 CP2 DP4 | ETP1 EP8", "p2p", "alltoall", "dropless",
                       fault="skip-cp-reduce"))
    return dict(zip(keys, verify_many(cases)))


@pytest.mark.parametrize("key", _selected(), ids=lambda k: " / ".join(k))
def test_context_parallel_folding_equals_single_process(reports, key):
    report = reports[key]
    assert report.max_loss_rel_diff <= LOSS_TOLERANCE
    assert report.max_grad_rel_diff <= TENSOR_TOLERANCE
    assert report.max_param_rel_diff <= TENSOR_TOLERANCE
    assert not report.drops.mismatches
    if CAPACITY[key[3]] is not None:
        assert report.drops.compared > 0  # dropping really was decided and checked
    assert report.passed


def test_skipping_the_cp_gradient_reduction_fails_the_checker(reports):
    report = reports[("fault",)]
    assert not report.passed
    assert report.max_grad_rel_diff > 1e-2


def _verify(*args):
    return subprocess.run([sys.executable, "-m", "folding", "verify", *args],
                          capture_output=True, text=True)


@pytest.mark.smoke
@pytest.mark.parametrize("args, message", [
    (["--cp", "2", "--seq-len", "30"],
     "seq-len=30 is not divisible by 2 x CP = 2 x 2 = 4 (Megatron's load-balanced "
     "context-parallel split)"),
    (["--cp", "8", "--ep", "8", "--cp-comm-type", "a2a"],
     "invalid folding: cp comm type a2a needs num_query_groups per TP rank divisible by CP: "
     "num_query_groups=4 / TP=1 = 4 is not divisible by CP=8"),
    (["--tp", "2", "--cp", "4", "--ep", "4", "--etp", "1", "--cp-comm-type", "a2a"],
     "invalid folding: cp comm type a2a needs num_query_groups per TP rank divisible by CP: "
     "num_query_groups=4 / TP=2 = 2 is not divisible by CP=4"),
    (["--cp", "2", "--cp-comm-type", "ring"],
     "invalid folding: unknown cp comm type 'ring'; known: p2p, all_gather, a2a"),
])
def test_bad_context_parallel_input_is_refused_in_one_line(args, message):
    done = _verify(*args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"folding verify: error: {message}"]
