"""The placement file (each refusal provoked on purpose) and the metrics, checked against hand
counts and against a brute-force enumeration of every replica choice."""

import itertools
import json

import numpy as np
import pytest

from folding.errors import FoldingError
from folding.placement.metrics import evaluate
from folding.placement.placement import Placement
from folding.placement.trace import RoutingTrace


def placement_json(**changes):
    obj = {"num_experts": 4, "num_layers": 2, "ep_size": 2, "slots_per_rank": 3, "gpus_per_node": 1,
           "layers": [[0, 1, 1, 2, 3, 0], [3, 2, 1, 0, 0, 2]]}
    obj.update(changes)
    return obj


def test_identity_and_helpers():
    p = Placement.identity(8, 3, 4, 2)
    assert p.slots_per_rank == 2 and p.redundant_slots == 0 and p.num_nodes == 2
    assert p.layers.tolist() == [list(range(8))] * 3
    assert [p.slot_to_rank(s) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.rank_nodes.tolist() == [0, 0, 1, 1]
    assert p.replicas_of(1, 5) == [5] and p.ranks_of(1, 5) == [2]


def test_replica_helpers_on_a_hand_made_placement():
    p = Placement.from_json(placement_json())
    assert p.redundant_slots == 1
    assert p.replicas_of(0, 1) == [1, 2] and p.ranks_of(0, 0) == [0, 1]
    assert p.replica_counts().tolist() == [[2, 2, 1, 1], [2, 1, 2, 1]]
    # layer 0: rank 0 holds 0, 1, 1 ; rank 1 holds 2, 3, 0
    assert p.host_fractions(0).tolist() == [[0.5, 0.5], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]


def test_save_load_roundtrip(tmp_path):
    p = Placement.from_json(placement_json())
    p.save(tmp_path / "p.json")
    back = Placement.load(tmp_path / "p.json")
    assert back.to_json() == p.to_json()
    assert json.loads((tmp_path / "p.json").read_text()) == placement_json()


@pytest.mark.parametrize("changes,message", [
    ({"layers": [[0, 1, 1, 2, 3, 0], [3, 2, 1, 0, 0, 2, 1]]}, "layer 1 has 7 slots but ep_size x slots_per_rank = 2 x 3 = 6"),
    ({"ep_size": 3}, "num_experts=4 is not divisible by ep_size=3"),
    ({"layers": [[0, 1, 1, 2, 3, 0]]}, "'layers' has 1 lists but num_layers=2"),
    ({"layers": [[0, 1, 1, 2, 3, 0], [3, 2, 1, 1, 1, 2]]}, "layer 1: expert 0 has no slot"),
    ({"layers": [[0, 1, 1, 2, 3, 4], [3, 2, 1, 0, 0, 2]]}, "layer 0, slot 5 holds expert 4, outside [0, 4)"),
    ({"slots_per_rank": 1, "layers": [[0, 1], [1, 0]]}, "slots_per_rank=1 is below num_experts/ep_size=2"),
    ({"ep_size": 0}, "ep_size must be a positive integer"),
    ({"layers": [[0, 1, 1, 2, 3, "x"], [3, 2, 1, 0, 0, 2]]}, "holds 'x', not an expert id"),
    ({"layers": "none"}, "'layers' must be a list of lists"),
])
def test_bad_placements_are_refused(changes, message):
    with pytest.raises(FoldingError) as error:
        Placement.from_json(placement_json(**changes), source="p.json")
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_files_are_refused(tmp_path):
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(FoldingError, match="is not valid JSON"):
        Placement.load(path)
    obj = placement_json()
    del obj["gpus_per_node"]
    path.write_text(json.dumps(obj))
    with pytest.raises(FoldingError, match="missing key 'gpus_per_node'"):
        Placement.load(path)
    with pytest.raises(FoldingError, match="cannot read placement"):
        Placement.load(tmp_path / "absent.json")


def test_validate_against_expected_sizes():
    p = Placement.from_json(placement_json())
    assert p.validate(num_experts=4, num_layers=2, ep_size=2) is p
    with pytest.raises(FoldingError, match="is for 4 experts but 8 are expected"):
        p.validate(num_experts=8)
    with pytest.raises(FoldingError, match="has 2 MoE layers but 3 are expected"):
        p.validate(num_layers=3)
    with pytest.raises(FoldingError, match="is for ep_size=2 but ep_size=4 is expected"):
        p.validate(ep_size=4)


def test_moved_fraction_counts_copies_that_arrive():
    old = Placement.identity(4, 1, 2, 1)                       # rank 0: 0 1 | rank 1: 2 3
    new = Placement(4, 1, 2, 2, 1, np.array([[1, 0, 2, 3]]))  # same sets: nothing moves
    assert new.moved_fraction(old) == 0.0
    swapped = Placement(4, 1, 2, 2, 1, np.array([[0, 2, 1, 3]]))  # 1 and 2 trade ranks
    assert swapped.moved_fraction(old) == 2 / 4


# ----------------------------------------------------------------------------- metrics
def brute_force_metrics(placement, trace):
    """B, D and X by enumerating every replica choice of every token, with plain loops."""
    P, S, G = placement.ep_size, placement.slots_per_rank, placement.gpus_per_node
    L, T = trace.num_layers, trace.num_tokens
    slots = [[[s for s in range(P * S) if placement.layers[l][s] == e] for e in range(trace.num_experts)]
             for l in range(L)]
    rank = lambda s: s // S  # noqa: E731
    node = lambda s: s // S // G  # noqa: E731
    loads = np.zeros((L, P))
    distinct = {"rank": 0.0, "node": 0.0}
    hops = {"rank": 0.0, "node": 0.0}
    for l in range(L):
        for t in range(T):
            experts = trace.topk[l, t].tolist()
            for e in experts:
                for s in slots[l][e]:
                    loads[l, rank(s)] += 1.0 / len(slots[l][e])
            choices = [slots[l][e] for e in experts]
            weight = 1.0 / np.prod([len(c) for c in choices])
            for pick in itertools.product(*choices):
                distinct["rank"] += weight * len({rank(s) for s in pick})
                distinct["node"] += weight * len({node(s) for s in pick})
            if l + 1 < L:
                before, after = slots[l][trace.topk[l, t, 0]], slots[l + 1][trace.topk[l + 1, t, 0]]
                for a in before:
                    for b in after:
                        share = 1.0 / (len(before) * len(after))
                        hops["rank"] += share * (rank(a) != rank(b))
                        hops["node"] += share * (node(a) != node(b))
    balance = loads.mean(axis=1).sum() / loads.max(axis=1).sum()
    return (balance, distinct["rank"] / (L * T), distinct["node"] / (L * T),
            hops["rank"] / ((L - 1) * T), hops["node"] / ((L - 1) * T))


def test_metrics_by_hand_without_replicas():
    trace = RoutingTrace(np.array([[[0, 1], [0, 2], [1, 3]], [[2, 3], [0, 3], [1, 2]]]), 4)
    p = Placement.identity(4, 2, 4, 2)  # expert e on rank e, ranks 0-1 on node 0
    m = evaluate(p, trace)
    # layer 0 loads 2,2,1,1 ; layer 1 loads 1,1,2,2 -> B = (1.5 + 1.5) / (2 + 2)
    assert m.balance == pytest.approx(0.75)
    assert m.d_gpu == pytest.approx(2.0)  # two distinct experts, each on its own rank
    # nodes of the pairs: {0,0} {0,1} {0,1} | {1,1} {0,1} {0,1} -> 1,2,2,1,2,2
    assert m.d_node == pytest.approx(10 / 6)
    # top-1 goes 0->2, 0->0, 1->1: one of three changes rank, one changes node
    assert m.x_gpu == pytest.approx(1 / 3) and m.x_node == pytest.approx(1 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force_with_replicas(seed):
    rng = np.random.default_rng(seed)
    E, L, T, k, P, S, G = 6, 3, 40, 3, 3, 3, 2
    topk = np.stack([np.stack([rng.choice(E, k, replace=False) for _ in range(T)]) for _ in range(L)])
    trace = RoutingTrace(topk.astype(np.int32), E)
    rows = []
    for _ in range(L):
        row = np.concatenate([np.arange(E), rng.integers(0, E, P * S - E)])
        rows.append(rng.permutation(row))
    placement = Placement(E, L, P, S, G, np.array(rows)).validate()
    m = evaluate(placement, trace)
    expected = brute_force_metrics(placement, trace)
    assert (m.balance, m.d_gpu, m.d_node, m.x_gpu, m.x_node) == pytest.approx(expected, rel=1e-9)


def test_single_layer_has_no_hops_and_cost_weights():
    trace = RoutingTrace(np.array([[[0, 1], [2, 3]]]), 4)
    m = evaluate(Placement.identity(4, 1, 2, 1), trace)
    assert np.isnan(m.x_gpu) and m.as_dict()["x_gpu"] is None
    # expert pairs {0,1} on rank 0 and {2,3} on rank 1: one rank and one node per token
    assert m.cost("training") == pytest.approx(1.0 + 4 * 1.0)
    with pytest.raises(FoldingError, match="unknown objective"):
        m.cost("speed")


def test_evaluate_refuses_a_placement_for_another_model():
    trace = RoutingTrace(np.array([[[0, 1]]]), 4)
    with pytest.raises(FoldingError, match="is for 8 experts but 4 are expected"):
        evaluate(Placement.identity(8, 1, 2, 1), trace)
