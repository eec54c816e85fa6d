"""The folded dispatcher against Megatron's alltoall dispatcher, and in whole training runs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from folding.megatron.model import MoERouting
from folding.mesh import FoldingSpec
from folding.placement.placement import Placement
from folding.run.launch import run_ranks
from folding.run.verify import VerifyCase, verify_many

pytestmark = [pytest.mark.megatron, pytest.mark.multiprocess]

# tiny-moe has 4 ranks per node: EP groups spanning both nodes relay through node gateways
# (node-level deduplication, on by default); one folding spans 4 nodes of 2 ranks.
FOLDINGS = [dict(tp=2, ep=4, etp=1), dict(tp=1, ep=8), dict(tp=4, ep=2, etp=2), dict(tp=2, ep=4, etp=2),
            dict(tp=2, pp=2, ep=4, etp=1), dict(tp=2, pp=2, ep=2, etp=2),
            dict(tp=1, ep=8, gpus_per_node=2)]
ROUTINGS = [("router", {}), ("forced", dict(capacity_factor=1.0, drop_policy="probs")),
            ("forced", dict(capacity_factor=1.0, drop_policy="position", pad_to_capacity=True)),
            ("router", dict(capacity_factor=1.0, drop_policy="probs", pad_to_capacity=True)),
            ("one rank", {}), ("router", dict(node_dedup=False))]


def _compare_layers(rank, world, cases):
    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy, initialize
    from folding.recipe import load_recipe
    from folding.testing.dispatcher_harness import (build_layer, copy_weights, forced_routing,
                                                    run_layer)

    enable()
    out = []
    for degrees, (mode, routing) in cases:
        recipe = load_recipe("tiny-moe", **degrees)
        initialize(recipe.folding)
        megatron = build_layer(recipe.model, recipe.training, recipe.folding, MoERouting(**routing))
        folded = build_layer(recipe.model, recipe.training, recipe.folding,
                             MoERouting(dispatcher="folded", **routing))
        copy_weights(megatron, folded)
        g = torch.Generator().manual_seed(7 + rank)
        tokens = 16
        hidden, grad = torch.randn(tokens, 2, 128, generator=g), torch.randn(tokens, 2, 128, generator=g)
        if mode != "router":
            logits = torch.randn(tokens * 2, 8, generator=g)
            # "one rank": every token picks experts 0 and 1, which live on EP rank 0 only.
            ids = (logits.topk(2, dim=1).indices if mode == "forced"
                   else torch.tensor([[0, 1]]).expand(tokens * 2, 2))
            for layer in (megatron, folded):
                forced_routing(layer, ids, logits, MoERouting(**routing))
        a, b = run_layer(megatron, hidden, grad), run_layer(folded, hidden, grad)
        rel = lambda x, y: float((x - y).norm() / y.norm()) if y.norm() > 0 else float(x.norm())  # noqa: E731
        out.append({"output": rel(b.output, a.output), "input_grad": rel(b.input_grad, a.input_grad),
                    "expert_grads": max(rel(x, y) for x, y in zip(b.expert_grads, a.expert_grads)),
                    "received": int(folded.token_dispatcher.pair_rows.numel())})
        destroy()
    return out


@pytest.fixture(scope="module")
def layer_comparisons():
    cases = [(d, r) for d in FOLDINGS for r in ROUTINGS]
    per_rank = run_ranks(_compare_layers, 8, cases)
    return {i: [r[i] for r in per_rank] for i in range(len(cases))}, cases


@pytest.mark.parametrize("index", range(len(FOLDINGS) * len(ROUTINGS)))
def test_outputs_and_gradients_equal_megatron_alltoall(layer_comparisons, index):
    results, cases = layer_comparisons
    for rank_result in results[index]:
        assert rank_result["output"] <= 1e-6, cases[index]
        assert rank_result["input_grad"] <= 1e-6, cases[index]
        assert rank_result["expert_grads"] <= 1e-6, cases[index]
    if cases[index][1][0] == "one rank":
        # Only EP rank 0 of each EP group computes; the others receive nothing and still finish.
        assert sum(r["received"] == 0 for r in results[index]) >= 4


def placement_file(path, ep, replicas, seed):
    rng = np.random.default_rng(seed)
    rows = []
    per = 8 // ep
    for _ in range(4):
        perm, extra = rng.permutation(8), rng.choice(8, ep, replace=False)
        rows.append(np.concatenate([np.concatenate([perm[per * r:per * (r + 1)], [extra[r]] * replicas])
                                    for r in range(ep)]))
    Placement(8, 4, ep, per + replicas, 4, np.stack(rows)).validate().save(path)
    return str(path)


@pytest.fixture(scope="module")
def verify_reports(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("placements")
    spec = lambda **kw: FoldingSpec(world_size=8, num_experts=8, num_layers=4, **kw)  # noqa: E731
    folded = MoERouting(dispatcher="folded")
    cases = {f"{d}": VerifyCase(spec(**d), folded) for d in
             [dict(tp=2, ep=4, etp=1), dict(tp=1, ep=8), dict(tp=4, ep=2, etp=2), dict(tp=2, ep=4, etp=2),
              dict(tp=2, pp=2, ep=4, etp=1), dict(tp=2, pp=2, vpp=2, ep=2, etp=2)]}
    cases["permuted"] = VerifyCase(spec(tp=2, ep=4, etp=1), folded,
                                   placement=placement_file(tmp / "perm.json", 4, 0, 1))
    cases["replicas"] = VerifyCase(spec(tp=2, ep=4, etp=1), folded,
                                   placement=placement_file(tmp / "rep.json", 4, 1, 2))
    cases["replicas etp2"] = VerifyCase(spec(tp=4, ep=2, etp=2), folded,
                                        placement=placement_file(tmp / "rep2.json", 2, 1, 3))
    cases["replicas dropping"] = VerifyCase(
        spec(tp=2, ep=4, etp=1), MoERouting(dispatcher="folded", capacity_factor=1.0, pad_to_capacity=True),
        placement=str(tmp / "rep.json"))
    cases["dropping position"] = VerifyCase(
        spec(tp=2, ep=4, etp=2), MoERouting(dispatcher="folded", capacity_factor=1.0, drop_policy="position"))
    keys = list(cases)
    return dict(zip(keys, verify_many([cases[k] for k in keys])))


# On megatron-core 0.19.2 the folded dispatcher is held to Megatron's alltoall dispatcher
# (test_outputs_and_gradients_equal_megatron_alltoall, test_megatron_loop) and `folding verify`
# to a single process: these eleven runs of the module fixture run on 0.16.1 only.
@pytest.mark.slow
@pytest.mark.primary_only
def test_folded_runs_train_like_a_single_process(verify_reports):
    for name, report in verify_reports.items():
        assert report.passed, (name, report.to_json())


@pytest.mark.slow
@pytest.mark.primary_only
def test_traffic_counters_add_up(verify_reports):
    report = verify_reports["{'tp': 2, 'ep': 4, 'etp': 1}"]
    last = report.traffic[-1]
    assert sorted(last) == [1, 2, 3, 4]
    for layer in last.values():
        # 8 ranks x 2 micro-batches x (2 x 32 tokens) / TP2 (sequence parallel) x top-2, dropless.
        assert layer["pairs_routed"] == 8 * 2 * 32 * 2 and layer["pairs_dropped"] == 0
        # Every routed pair is computed on some rank, once.
        assert layer["mean_pairs_per_rank"] * 8 == layer["pairs_routed"]
        rows = layer["tokens_self"] + layer["tokens_node"] + layer["tokens_remote"]
        assert 8 * 2 * 32 <= rows < layer["pairs_routed"]  # deduplicated: fewer rows than pairs
        assert layer["bytes_node"] == layer["tokens_node"] * 128 * 4


def _replace(rank, world, path):
    from folding.megatron.cpu_runtime import enable
    from folding.recipe import load_recipe
    from folding.run.corpus import ByteCorpus, micro_batches
    from folding.run.rank_trainer import RankTrainer

    enable()
    recipe = load_recipe("tiny-moe")
    routing = MoERouting(dispatcher="folded")
    spec, training = recipe.folding, recipe.training
    corpus = ByteCorpus(training.data)
    per = training.global_batch_size // (training.micro_batch_size * spec.dp)
    dp = spec.coordinates(rank)["attention"]["dp"]
    batch = lambda s: micro_batches(corpus.global_batch(1, s, training.global_batch_size,  # noqa: E731
                                                        training.seq_length), dp, spec.dp, per,
                                    training.micro_batch_size)
    a = RankTrainer(recipe.model, training, spec, routing)
    b = RankTrainer(recipe.model, training, spec, routing)
    for s in range(2):
        a.step(batch(s)), b.step(batch(s))
    before = b.full_state()
    b = b.with_placement(Placement.load(path))
    after = b.full_state()
    same = all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    same &= all(torch.equal(before["optimizer"][f][k], after["optimizer"][f][k])
                for f in ("exp_avg", "exp_avg_sq") for k in before["optimizer"][f])
    losses = [(a.step(batch(s)).loss, b.step(batch(s)).loss) for s in range(2, 4)]
    return same, losses, before["optimizer"]["step"] == after["optimizer"]["step"] == 2


@pytest.mark.slow
def test_replacement_keeps_function_and_optimizer_state(tmp_path):
    path = placement_file(tmp_path / "rep.json", 4, 1, 5)
    for same, losses, steps in run_ranks(_replace, 8, path):
        assert same and steps
        for unchanged, moved in losses:
            assert abs(unchanged - moved) / unchanged <= 1e-6


@pytest.mark.parametrize("edit,message", [
    (lambda p: p.update(Placement.identity(16, 4, 4, 4).to_json()), "is for 16 experts but 8 are expected"),
    (lambda p: p["layers"][1].__setitem__(0, p["layers"][1][1]), "has no slot"),
    (lambda p: p.update(ep_size=2, slots_per_rank=4), "is for ep_size=2 but ep_size=4 is expected"),
    (lambda p: p.update(num_layers=3, layers=p["layers"][:3]), "has 3 MoE layers but 4 are expected"),
    (None, "is not valid JSON"),
])
def test_bad_placements_are_refused_before_anything_runs(tmp_path, edit, message):
    path = tmp_path / "p.json"
    if edit is None:
        path.write_text("{\"num_experts\": 8,")
    else:
        obj = Placement.identity(8, 4, 4, 4).to_json()
        edit(obj)
        path.write_text(json.dumps(obj))
    proc = subprocess.run([sys.executable, "-m", "folding", "verify", "--tp", "2", "--ep", "4", "--etp", "1",
                           "--dispatcher", "folded", "--placement", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _two_placements(rank, world, placement_path):
    import torch.distributed as dist

    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy, initialize
    from folding.recipe import load_recipe
    from folding.testing.dispatcher_harness import build_layer, run_layer

    enable()
    recipe = load_recipe("tiny-moe", tp=1, ep=8)
    initialize(recipe.folding)
    routing = MoERouting(dispatcher="folded")
    layers = [build_layer(recipe.model, recipe.training, recipe.folding, routing, placement=p)
              for p in (None, Placement.load(placement_path))]
    grads = []
    for layer in layers:
        dispatcher = layer.token_dispatcher
        assert dispatcher.node_dedup  # EP8 over two nodes of 4
        per_rank = dispatcher.slots_per_rank
        here = dispatcher.slot_map.slot_expert[dispatcher.ep_rank * per_rank:][:per_rank].tolist()
        with torch.no_grad():  # every logical expert has the same weights in both layers
            for local, expert in zip(layer.experts.local_experts, here):
                g = torch.Generator().manual_seed(100 + expert)
                for p in local.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        grads.append(here)
    layers[1].router.load_state_dict(layers[0].router.state_dict())
    g = torch.Generator().manual_seed(7 + rank)
    hidden, grad = torch.randn(16, 2, 128, generator=g), torch.randn(16, 2, 128, generator=g)
    runs = [run_layer(layer, hidden, grad) for layer in layers]
    by_expert = []
    for here, run in zip(grads, runs):
        per_expert = len(run.expert_grads) // len(here)
        by_expert.append({e: run.expert_grads[i * per_expert:(i + 1) * per_expert]
                          for i, e in enumerate(here)})
    gathered = [None] * world
    dist.all_gather_object(gathered, by_expert)
    destroy()
    same_grads = all(torch.equal(x, y)
                     for e in range(8)
                     for x, y in zip(next(r[0][e] for r in gathered if e in r[0]),
                                     next(r[1][e] for r in gathered if e in r[1])))
    return (torch.equal(runs[0].output, runs[1].output),
            torch.equal(runs[0].input_grad, runs[1].input_grad), same_grads)


def test_where_an_expert_lives_changes_no_bit(tmp_path):
    """With node-level deduplication, experts moved across nodes (expert e on rank 7 - e) give
    the same outputs, input gradients and expert gradients to the bit as the contiguous layout:
    each expert takes its rows in the same order wherever it lives, so re-placement during
    training changes nothing at all (top-2, fp32)."""
    path = tmp_path / "reversed.json"
    Placement(8, 4, 8, 1, 4, np.tile(np.arange(8)[::-1], (4, 1))).validate().save(path)
    assert run_ranks(_two_placements, 8, str(path), timeout_s=600) == [(True, True, True)] * 8
