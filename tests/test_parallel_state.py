"""Megatron-Core builds the same groups as the folded mesh, through a real gloo initialize()."""

import pytest

from folding.megatron.groups import check_on_gloo, compare_with_megatron
from folding.mesh import FoldingSpec
from folding.run.launch import RankFailed

pytestmark = [pytest.mark.megatron, pytest.mark.multiprocess]

WORLD8 = [
    dict(tp=2, ep=4, etp=1),
    dict(tp=1, ep=8),
    dict(tp=4, ep=2, etp=2),
    dict(tp=2, ep=4, etp=2),
    dict(tp=2, pp=2, ep=4, etp=1),
    dict(tp=2, pp=2, vpp=2, ep=2, etp=2),
    dict(tp=2, cp=2, ep=8, etp=1),
    dict(tp=2, cp=2, pp=2, ep=4, etp=1, order="tp-cp-ep-pp-dp"),
]


def test_initialize_on_gloo_world8():
    specs = [FoldingSpec(world_size=8, **kw) for kw in WORLD8]
    # 10 group kinds per rank per folding, all compared with the pure-Python mesh.
    assert check_on_gloo(specs) == 10 * 8 * len(specs)


def test_initialize_on_gloo_world4():
    specs = [FoldingSpec(world_size=4, **kw) for kw in (dict(tp=2, ep=2, etp=1), dict(pp=2, ep=2))]
    assert check_on_gloo(specs) == 10 * 4 * len(specs)


def test_mismatch_is_reported_by_rank():
    """The start-up check can fail: Megatron groups for one folding against another's mesh."""
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1)
    other = FoldingSpec(world_size=8, tp=2, ep=4, etp=1, order="tp-cp-dp-ep-pp")
    megatron_like = {(m, k): spec.group_of(3, m, k)
                     for m, k in [("attention", "tp"), ("moe", "ep"), ("moe", "edp")]}
    problems = compare_with_megatron(other, 3, megatron_like)
    assert problems and all(p.startswith("rank 3: Megatron's") for p in problems)
    assert compare_with_megatron(spec, 3, megatron_like) == []


def test_initialize_raises_on_every_rank_when_megatron_disagrees():
    """A spawned run where the mesh is wrong stops with a message naming a rank."""
    wrong = _SwappedOrder(world_size=4, tp=2, ep=2, etp=1)
    with pytest.raises(RankFailed, match=r"rank \d+ failed: MeshMismatch: rank \d+: Megatron's"):
        check_on_gloo([wrong])


class _SwappedOrder(FoldingSpec):
    """A mesh that tells Megatron one order and computes its own groups in another."""

    def group_of(self, rank, mesh, kind):
        return FoldingSpec(**{**self.degrees(), "order": "tp-cp-dp-ep-pp"}).group_of(rank, mesh, kind)
