"""The CPU runtime: scoped, a no-op with CUDA, and Megatron's model built as the layout says."""

import pytest
import torch

from folding.megatron import cpu_runtime as cpu
from folding.run.launch import run_ranks

pytestmark = pytest.mark.megatron


def test_scoped_and_restored():
    before = (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.type)
    with cpu.cpu_runtime() as on:
        assert on
        x = torch.zeros(3, device="cuda")
        assert x.device.type == "cpu"
        assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"  # Megatron's type-string checks pass
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.synchronize()
    assert (torch.cuda.current_device, torch.cuda.Stream, torch.Tensor.type) == before
    assert torch.zeros(1).type() == "torch.FloatTensor"
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")


def test_no_op_where_cuda_is_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    with cpu.cpu_runtime() as on:
        assert not on
        assert torch.cuda.current_device is before


def _uneven_gather(rank, world):
    import torch.distributed as dist

    from folding.megatron.cpu_runtime import enable

    enable()
    mine = torch.arange(rank + 1, dtype=torch.float32) + 10 * rank
    out = [torch.empty(r + 1) for r in range(world)]
    dist.all_gather(out, mine)
    return [t.tolist() for t in out]


@pytest.mark.multiprocess
@pytest.mark.smoke
def test_uneven_all_gather_on_gloo():
    """NCCL gathers tensors of different sizes and gloo refuses; the runtime makes gloo agree."""
    results = run_ranks(_uneven_gather, 3)
    expected = [[0.0], [10.0, 11.0], [20.0, 21.0, 22.0]]
    assert results == [expected] * 3


def _model_shapes(rank, world, foldings):
    from folding.layout.weights import named_parameters_of_chunks
    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy, initialize
    from folding.megatron.model import build_model_chunks
    from folding.recipe import load_recipe

    enable()
    out = []
    for degrees in foldings:
        recipe = load_recipe("tiny-moe", **degrees)
        initialize(recipe.folding)
        chunks = build_model_chunks(recipe.model, recipe.training, recipe.folding)
        out.append({k: tuple(v.shape) for k, v in named_parameters_of_chunks(chunks).items()})
        destroy()
    return out


@pytest.mark.multiprocess
def test_megatron_model_matches_the_weight_layout():
    """Every parameter Megatron builds on every rank is what folding.layout.weights says, by name and
    shape, and nothing is missing or extra."""
    from folding.layout.parameters import full_parameters
    from folding.layout.weights import shard
    from folding.recipe import load_recipe

    foldings = [dict(world_size=8, tp=2, ep=4, etp=1), dict(world_size=8, tp=4, ep=2, etp=2),
                dict(world_size=8, tp=2, pp=2, vpp=2, ep=2, etp=2), dict(world_size=8, tp=1, pp=2, ep=4)]
    per_rank = run_ranks(_model_shapes, 8, foldings)
    for i, degrees in enumerate(foldings):
        recipe = load_recipe("tiny-moe", **degrees)
        full = {n: torch.empty(s) for n, s in full_parameters(recipe.model).items()}
        for rank in range(8):
            expected = {k: tuple(v.shape) for k, v in shard(full, recipe.model, recipe.folding, rank).items()}
            assert per_rank[rank][i] == expected, (degrees, rank)


def _gloo_threads() -> int:
    import os

    tasks = os.listdir("/proc/self/task")
    return sum(open(f"/proc/self/task/{t}/comm").read().startswith("gloo_tcp") for t in tasks)


def _trainers_in_turn(rank, world, close):
    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy
    from folding.recipe import load_recipe
    from folding.run.corpus import ByteCorpus, micro_batches
    from folding.run.rank_trainer import RankTrainer

    enable()
    recipe = load_recipe("tiny-moe", world_size=4, tp=2, ep=2, etp=1)
    spec, training = recipe.folding, recipe.training
    batch = ByteCorpus(training.data).global_batch(1, 0, 2 * spec.dp, 32)
    dp = spec.coordinates(rank)["attention"]["dp"]
    counts = [_gloo_threads()]
    for _ in range(2):
        trainer = RankTrainer(recipe.model, training, spec)
        trainer.step(micro_batches(batch, dp, spec.dp, 2, 1))
        if close:
            trainer.close()
        del trainer
        destroy()
        counts.append(_gloo_threads())
    return counts


@pytest.mark.multiprocess
def test_closed_trainers_let_go_of_their_process_groups():
    """A rank that trains foldings in turn (the checker, the memory measurements) must not keep
    every folding's groups: without ``close``, Megatron's DDP, kept alive by autograd's gradient
    accumulators, holds all 16 of this folding's gloo groups per trainer (the check can fail),
    and Megatron's rotary embedding, memoised in a class-level cache, holds the context-parallel
    group. With it no group stays: idle gloo threads are what slowed a long run of cases."""
    for before, first, second in run_ranks(_trainers_in_turn, 4, True):
        assert first == before and second == first
    for before, first, second in run_ranks(_trainers_in_turn, 4, False):
        assert first - before >= 10 and second - first >= 10
