"""The pure-Python folded mesh: derivation, validation rules, and groups equal to Megatron's."""

import itertools

import pytest

from folding.errors import InvalidFolding
from folding.mesh import ATTENTION_GROUPS, MOE_GROUPS, FoldingSpec, grid_groups

# (world, tp, cp, pp, etp, ep, order): the foldings named in the issue first.
NAMED_FOLDINGS = [
    (8, 2, 1, 1, 1, 4, "tp-cp-ep-dp-pp"),
    (16, 2, 2, 1, 1, 8, "tp-cp-ep-dp-pp"),
    (256, 4, 2, 4, 1, 64, "tp-cp-ep-dp-pp"),  # Megatron's own folding example
    (128, 2, 1, 8, 1, 8, "tp-cp-ep-dp-pp"),  # Mixtral 8x22B
]


def all_foldings():
    out = list(NAMED_FOLDINGS)
    for order in ("tp-cp-ep-dp-pp", "tp-cp-ep-pp-dp", "tp-pp-dp-cp-ep"):
        for world, tp, cp, pp, etp, ep in itertools.product(
                (8, 32, 64), (1, 2, 4), (1, 2), (1, 2, 4), (1, 2), (1, 4, 8)):
            if world % (tp * cp * pp) or world % (etp * ep * pp):
                continue
            try:
                FoldingSpec(world_size=world, tp=tp, cp=cp, pp=pp, etp=etp, ep=ep, order=order)
            except InvalidFolding:
                continue  # orders Megatron refuses unless both meshes share PP groups
            out.append((world, tp, cp, pp, etp, ep, order))
    return out


def megatron_groups(spec):
    """The groups as megatron-core's own RankGenerator builds them in initialize_model_parallel."""
    from megatron.core.parallel_state import RankGenerator

    attention = RankGenerator(tp=spec.tp, ep=1, dp=spec.dp, pp=spec.pp, cp=spec.cp, order=spec.order)
    moe = RankGenerator(tp=spec.etp, ep=spec.ep, dp=spec.edp, pp=spec.pp, cp=1, order=spec.order)
    return {"attention": {k: attention.get_ranks("-".join(v)) for k, v in ATTENTION_GROUPS.items()},
            "moe": {k: moe.get_ranks("-".join(v)) for k, v in MOE_GROUPS.items()}}


@pytest.mark.megatron
def test_groups_equal_megatron_rank_generator():
    foldings = all_foldings()
    assert len(foldings) >= 30
    for world, tp, cp, pp, etp, ep, order in foldings:
        spec = FoldingSpec(world_size=world, tp=tp, cp=cp, pp=pp, etp=etp, ep=ep, order=order)
        assert spec.rank_groups() == megatron_groups(spec), spec.describe()


@pytest.mark.megatron
def test_comparison_detects_a_wrong_mesh():
    """The comparison above is able to fail: a mesh in another order differs from Megatron's."""
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1)
    wrong = FoldingSpec(world_size=8, tp=2, ep=4, etp=1, order="tp-cp-dp-ep-pp")
    assert wrong.rank_groups() != megatron_groups(spec)


def test_named_groups_by_hand():
    # world 8, TP2 EP4 ETP1: attention TP pairs, DP strided by 2; EP groups of 4 consecutive ranks.
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1)
    g = spec.rank_groups()
    assert g["attention"]["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["attention"]["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["moe"]["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["moe"]["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["moe"]["etp"] == [[r] for r in range(8)]
    # Megatron's folding example: EP64 covers a whole PP stage of TP4 x CP2 x DP8.
    big = FoldingSpec(world_size=256, tp=4, cp=2, pp=4, etp=1, ep=64)
    assert big.dp == 8 and big.edp == 1
    assert big.rank_groups()["moe"]["ep"] == [list(range(s * 64, (s + 1) * 64)) for s in range(4)]


def test_derivation():
    s = FoldingSpec(world_size=128, tp=2, pp=8, ep=8, etp=1)
    assert (s.dp, s.edp, s.cp, s.sequence_parallel) == (8, 2, 1, True)
    assert FoldingSpec(tp=2, dp=4, ep=4, etp=1).world_size == 8
    assert FoldingSpec(world_size=8, tp=2).etp == 2  # ETP defaults to TP, as in Megatron
    assert FoldingSpec(world_size=8, pp=2, vpp=1).vpp is None


def test_coordinates_agree_with_groups():
    spec = FoldingSpec(world_size=32, tp=2, cp=2, pp=2, etp=2, ep=4)
    for rank in range(spec.world_size):
        c = spec.coordinates(rank)
        assert spec.group_of(rank, "attention", "tp").index(rank) == c["attention"]["tp"]
        assert spec.group_of(rank, "attention", "dp").index(rank) == c["attention"]["dp"]
        assert spec.group_of(rank, "moe", "ep").index(rank) == c["moe"]["ep"]
        assert spec.group_of(rank, "moe", "edp").index(rank) == c["moe"]["edp"]
        assert spec.group_of(rank, "attention", "pp").index(rank) == c["moe"]["pp"] == c["attention"]["pp"]


def test_grid_groups_partition_the_world():
    sizes = {"tp": 2, "cp": 1, "ep": 4, "dp": 3, "pp": 2}
    for span in (("tp",), ("ep", "dp"), ("pp", "tp")):
        groups = grid_groups(sizes, ["tp", "cp", "ep", "dp", "pp"], span)
        assert sorted(r for g in groups for r in g) == list(range(48))


def test_layout_report_names_cross_node_groups():
    spec = FoldingSpec(world_size=16, tp=2, ep=16, etp=1, gpus_per_node=8)
    msgs = {(s.mesh, s.kind): s.message for s in spec.layout_report()}
    assert msgs[("moe", "ep")] == "EP group spans 2 nodes: the all-to-all crosses the network"
    assert msgs[("attention", "tp")].startswith("TP groups stay inside one node")
    assert msgs[("moe", "etp")] == "ETP groups have one rank: no communication"


# One bad input per rule; each must be refused with a message naming the rule and numbers.
BAD = [
    (dict(world_size=8, tp=3), "world_size=8 is not divisible by TP=3 x CP=1 x PP=1 = 3"),
    (dict(world_size=8, tp=2, dp=2), "TP=2 x CP=1 x DP=2 x PP=1 = 4 != world_size=8"),
    (dict(world_size=8, ep=3, etp=1), "world_size=8 is not divisible by ETP=1 x EP=3 x PP=1 = 3"),
    (dict(world_size=8, ep=2, etp=1, edp=2), "ETP=1 x EP=2 x EDP=2 x PP=1 = 4 != world_size=8"),
    (dict(world_size=48, ep=6, etp=1, num_experts=8), "EP=6 does not divide num_experts=8"),
    (dict(world_size=8, tp=8, num_attention_heads=12), "TP=8 does not divide num_attention_heads=12"),
    (dict(world_size=8, tp=8, num_query_groups=4), "TP=8 does not divide num_query_groups=4"),
    (dict(world_size=8, tp=2, ep=2, sequence_parallel=False),
     "sequence parallel is required with TP>1 in MoE layers (TP=2, EP=2)"),
    (dict(world_size=8, tp=1, sequence_parallel=True), "sequence parallel needs TP>1 (TP=1)"),
    (dict(world_size=8, vpp=2), "VPP=2 needs PP>1 (PP=1)"),
    (dict(world_size=8, pp=4, vpp=2, num_layers=12), "num_layers=12 is not divisible by PP=4 x VPP=2 = 8"),
    (dict(world_size=8, pp=4, num_layers=6), "num_layers=6 is not divisible by PP=4"),
    (dict(world_size=8, order="tp-cp-xp-dp-pp"), "unknown dimension 'xp'"),
    (dict(world_size=8, order="tp-tp-ep-dp-pp"), "dimension 'tp' appears more than once"),
    (dict(world_size=8, tp=2, order="cp-ep-dp-pp"), "leaves out 'tp', whose size is above 1"),
    (dict(world_size=8, tp=2, pp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp"),
     "order 'tp-cp-ep-pp-dp' does not end with pp, so Megatron needs DP == EDP (DP=2, EDP=1)"),
    (dict(world_size=8, tp=2, pp=2, ep=2, etp=1, cp=1, order="tp-pp-dp-cp-ep"),
     "PP groups of the attention and MoE meshes differ ([0, 2] vs [0, 1]); put pp last"),
    (dict(world_size=8, tp=0), "TP=0 must be a positive integer"),
    (dict(world_size=8, gpus_per_node=0), "gpus_per_node=0 must be a positive integer"),
    (dict(tp=2), "world_size is missing"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[m[:40] for _, m in BAD])
def test_every_rule_refuses_bad_input(kwargs, message):
    with pytest.raises(InvalidFolding) as e:
        FoldingSpec(**kwargs)
    assert message in str(e.value)


def test_one_message_per_violated_rule():
    with pytest.raises(InvalidFolding) as e:
        FoldingSpec(world_size=48, tp=8, ep=6, etp=1, num_experts=8, num_attention_heads=12)
    assert len(e.value.violations) == 2
