"""The equivalence checker: a folded run must train exactly like a single process.

``verify(case)`` runs the same model from the same weights on the same batches twice: once in a
single process (the reference: TP = PP = EP = 1, every micro-batch in turn) and once on local
ranks in the folding under test, both on the same kind of device (``folding.run.device``: the
CPU with gloo, or one GPU per rank with NCCL; never one of each). After every step it compares the loss, every reduced
gradient and every updated parameter. Each rank compares its own shards with the reference
(through the weight layout), so only per-tensor error sums travel back; every replica of a slice
(DP, EDP and TP copies) is compared, so a replica that drifted is caught too.

Token dropping in Megatron is decided per rank, over the tokens that rank routes (a TP x CP
shard of each micro-batch's sequence). The reference therefore applies the same capacity rule
over the same groups of tokens; ``folding.run.drop_decisions`` compares every decision and keeps
rounding-level near ties from swamping the comparison.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from folding.context_parallel.layout import check_sequence_length
from folding.errors import FoldingError
from folding.megatron.groups import destroy
from folding.megatron.model import MoERouting
from folding.mesh import FoldingSpec
from folding.recipe import Recipe, load_recipe
from folding.run.device import DeviceChoice
from folding.run.drop_decisions import DropCheck, DropDecisions

LOSS_TOLERANCE = 1e-5
TENSOR_TOLERANCE = 1e-4
FAULTS = ("skip-expert-dp-reduce", "skip-tp-norm-reduce", "skip-cp-reduce", "halve-capacity")


@dataclass
class VerifyCase:
    """One folding to check, and how to run it."""

    spec: FoldingSpec
    routing: MoERouting = field(default_factory=MoERouting)
    recipe: str = "tiny-moe"
    steps: int = 3
    seq_len: int = 32
    micro_batches: int = 2
    """Micro-batches per data-parallel rank per step."""
    micro_batch_size: int = 2
    seed: int = 1234
    fault: Optional[str] = None
    """Break the folded run on purpose (one of FAULTS), to show the checker fails."""
    placement: Optional[str] = None
    """Placement file for the folded dispatcher (None: Megatron's contiguous experts)."""

    def __post_init__(self):
        if self.fault is not None and self.fault not in FAULTS:
            raise FoldingError(f"unknown fault {self.fault!r}; known: {', '.join(FAULTS)}")
        if self.steps < 1 or self.micro_batches < 1 or self.micro_batch_size < 1:
            raise FoldingError("steps, micro-batches and micro-batch size must be at least 1")
        if self.placement is not None and self.routing.dispatcher != "folded":
            raise FoldingError("--placement needs --dispatcher folded")
        check_sequence_length(self.seq_len, self.spec)

    def load_recipe(self) -> Recipe:
        recipe = load_recipe(self.recipe, **self.spec.degrees())
        training = dataclasses.replace(
            recipe.training, seq_length=self.seq_len, micro_batch_size=self.micro_batch_size,
            seed=self.seed, train_iters=max(self.steps, recipe.training.train_iters),
            global_batch_size=self.global_sequences)
        return dataclasses.replace(recipe, training=training)

    @property
    def global_sequences(self) -> int:
        return self.spec.dp * self.micro_batches * self.micro_batch_size

    def load_placement(self):
        """The placement, checked against the model and folding before anything runs."""
        if self.placement is None:
            return None
        from folding.megatron.model import check_placement
        from folding.placement.placement import Placement

        placement = Placement.load(self.placement)
        check_placement(placement, self.load_recipe().model, self.spec)
        return placement

    def reference_spec(self) -> FoldingSpec:
        return FoldingSpec(world_size=1, gpus_per_node=1)


@dataclass
class StepComparison:
    step: int
    loss_reference: float
    loss_folded: float
    loss_rel_diff: float
    grad_rel_diff: Dict[str, float]
    param_rel_diff: Dict[str, float]

    @property
    def worst_grad(self) -> Tuple[str, float]:
        return max(self.grad_rel_diff.items(), key=lambda kv: kv[1])

    @property
    def worst_param(self) -> Tuple[str, float]:
        return max(self.param_rel_diff.items(), key=lambda kv: kv[1])


@dataclass
class VerifyReport:
    case: VerifyCase
    steps: List[StepComparison]
    drops: DropCheck = field(default_factory=DropCheck)
    traffic: Optional[list] = None
    device: Optional[DeviceChoice] = None
    """Where the reference and the folded ranks ran, and why."""

    @property
    def max_loss_rel_diff(self) -> float:
        return max(s.loss_rel_diff for s in self.steps)

    @property
    def max_grad_rel_diff(self) -> float:
        return max(s.worst_grad[1] for s in self.steps)

    @property
    def max_param_rel_diff(self) -> float:
        return max(s.worst_param[1] for s in self.steps)

    @property
    def passed(self) -> bool:
        return (self.max_loss_rel_diff <= LOSS_TOLERANCE and self.max_grad_rel_diff <= TENSOR_TOLERANCE
                and self.max_param_rel_diff <= TENSOR_TOLERANCE and not self.drops.mismatches)

    def to_json(self) -> dict:
        folding = self.case.spec.degrees()
        folding.update(dispatcher=self.case.routing.dispatcher,
                       capacity_factor=self.case.routing.capacity_factor,
                       drop_policy=self.case.routing.drop_policy,
                       pad_to_capacity=self.case.routing.pad_to_capacity,
                       placement=self.case.placement)
        out = {"folding": folding, "steps": len(self.steps),
               "max_loss_rel_diff": self.max_loss_rel_diff,
               "max_grad_rel_diff": self.max_grad_rel_diff,
               "max_param_rel_diff": self.max_param_rel_diff,
               "drop_decisions": {"compared": self.drops.compared,
                                  "near_ties": self.drops.near_ties,
                                  "mismatches": len(self.drops.mismatches)},
               "passed": self.passed,
               "device": self.device.to_json() if self.device else None}
        if self.traffic is not None:
            out["traffic"] = self.traffic
        return out


# ------------------------------------------------------------------------------ rank bodies
def _micro_batches_for(case: VerifyCase, spec: FoldingSpec, rank: int, step: int, corpus, device):
    from folding.run.corpus import micro_batches

    batch = corpus.global_batch(case.seed, step, case.global_sequences, case.seq_len, device)
    dp_rank = spec.coordinates(rank)["attention"]["dp"]
    per_rank = case.micro_batches * case.spec.dp // spec.dp
    return micro_batches(batch, dp_rank, spec.dp, per_rank, case.micro_batch_size)


def _reference_rank(rank: int, world: int, cases: List[VerifyCase], paths: List[str]) -> int:
    """Single-process runs; each writes per-step loss, full grads and params to its path."""
    from folding.layout.weights import unshard
    from folding.megatron.cpu_runtime import enable
    from folding.run.corpus import ByteCorpus
    from folding.run.rank_trainer import RankTrainer

    enable()
    for case, out_path in zip(cases, paths):
        recipe = case.load_recipe()
        spec = case.reference_spec()
        routing = dataclasses.replace(case.routing, dispatcher="alltoall")
        decisions = DropDecisions("record", sequence_parallel=_sequence_shards(case.spec),
                                  cp=case.spec.cp)
        decisions.install()
        trainer = RankTrainer(recipe.model, recipe.training, spec, routing)
        corpus = ByteCorpus(recipe.training.data)
        steps = []
        for step in range(case.steps):
            decisions.start_step(step)
            result = trainer.step(_micro_batches_for(case, spec, rank, step, corpus, trainer.device),
                                  keep_grads=True)
            steps.append({"loss": result.loss,
                          "grads": unshard([result.grads], recipe.model, spec),
                          "params": unshard([trainer.param_shard()], recipe.model, spec)})
        torch.save({"steps": steps, "drops": decisions.records}, out_path)
        decisions.uninstall()
        trainer.close()
        destroy()
    return len(cases)


def _sequence_shards(spec: FoldingSpec) -> int:
    """How many sequence-parallel shards a CP rank's tokens are cut into before the router."""
    return spec.tp if spec.sequence_parallel else 1


def _error_sums(local: Dict, reference_full: Dict, arch, spec: FoldingSpec, rank: int,
                placement=None):
    """{(full name, slice index): (||a-b||^2, ||b||^2)} for this rank's shard; of several copies
    of a slice on the rank (replica slots), the worst."""
    from folding.layout.weights import _split_index, local_to_full_name, param_rule, slice_for

    out = {}
    for (vp_stage, name), tensor in local.items():
        full_name = local_to_full_name(name, arch, spec, rank, vp_stage, placement)
        rule = param_rule(full_name, arch.swiglu)
        index, parts = _split_index(rule, spec, rank)
        expected = slice_for(reference_full[full_name], rule, index, parts)
        diff = (tensor.double() - expected.double()).pow(2).sum().item()
        if diff >= out.get((full_name, index), (-1.0, 0.0))[0]:
            out[(full_name, index)] = (diff, expected.double().pow(2).sum().item())
    return out


def _break(trainer, fault: Optional[str]) -> None:
    """Deliberately wrong gradient reductions, to prove the checker catches them
    (halve-capacity is applied to the routing before the model is built)."""
    if fault == "skip-expert-dp-reduce":
        for d in trainer.ddp:
            d.expert_parallel_bucket_groups = []
    elif fault == "skip-cp-reduce":
        # Dense gradients reduced over DP alone, as if the CP ranks held whole sequences.
        from megatron.core import parallel_state as ps

        dp_only = ps.get_data_parallel_group(with_context_parallel=False)
        for d in trainer.ddp:
            for bucket_group in d.bucket_groups:
                bucket_group.data_parallel_group = dp_only
                bucket_group.intra_distributed_optimizer_instance_group = dp_only
    elif fault == "skip-tp-norm-reduce":
        for param in trainer.params.values():
            if getattr(param, "sequence_parallel", False):
                param.sequence_parallel = False


def _folded_rank(rank: int, world: int, cases: List[VerifyCase], paths: List[str]):
    from folding.megatron.cpu_runtime import enable

    enable()
    out = []
    for case, reference_path in zip(cases, paths):
        out.append(_folded_case(rank, case, reference_path))
        destroy()
    return out


def _folded_case(rank: int, case: VerifyCase, reference_path: str):
    from folding.run.corpus import ByteCorpus
    from folding.run.rank_trainer import RankTrainer

    recipe = case.load_recipe()
    # Every tensor in it is a CPU tensor, whichever device wrote it.
    reference = torch.load(reference_path, weights_only=False, map_location="cpu")
    coords = case.spec.coordinates(rank)["attention"]
    shards = _sequence_shards(case.spec)
    group = (coords["tp"] if shards > 1 else 0) + shards * coords["cp"]
    decisions = DropDecisions("replay", records=reference["drops"],
                              micro_batches=case.micro_batches, dp_rank=coords["dp"], group=group)
    decisions.install()
    routing = case.routing
    if case.fault == "halve-capacity" and routing.capacity_factor is not None:
        routing = dataclasses.replace(routing, capacity_factor=routing.capacity_factor / 2)
    placement = case.load_placement()
    trainer = RankTrainer(recipe.model, recipe.training, case.spec, routing, placement=placement)
    _break(trainer, case.fault)
    corpus = ByteCorpus(recipe.training.data)
    reference = reference["steps"]
    steps = []
    for step in range(case.steps):
        decisions.start_step(step)
        result = trainer.step(_micro_batches_for(case, case.spec, rank, step, corpus, trainer.device),
                              keep_grads=True)
        steps.append({"loss": result.loss,
                      "grads": _error_sums(result.grads, reference[step]["grads"], recipe.model,
                                           case.spec, rank, placement),
                      "params": _error_sums(trainer.param_shard(), reference[step]["params"],
                                            recipe.model, case.spec, rank, placement)})
    decisions.uninstall()
    traffic = trainer.traffic_report()
    trainer.close()
    return {"steps": steps, "drops": decisions.check, "traffic": traffic}


def _relative_by_tensor(per_rank: List[Dict]) -> Dict[str, float]:
    """Per full tensor ||a-b|| / ||b||, taking the worst replica of every slice."""
    worst: Dict[Tuple[str, int], Tuple[float, float]] = {}
    for sums in per_rank:
        for key, (diff, ref) in sums.items():
            if key not in worst or diff > worst[key][0]:
                worst[key] = (diff, ref)
    totals: Dict[str, List[float]] = {}
    for (name, _), (diff, ref) in worst.items():
        t = totals.setdefault(name, [0.0, 0.0])
        t[0] += diff
        t[1] += ref
    return {name: (math.sqrt(d) / math.sqrt(r) if r > 0 else (0.0 if d == 0 else math.inf))
            for name, (d, r) in totals.items()}


def verify(case: VerifyCase, timeout_s: float = 1200, progress: bool = False,
           device: str = "auto") -> VerifyReport:
    """Run the reference and the folded model; compare them step by step."""
    return verify_many([case], timeout_s=timeout_s, progress=progress, device=device)[0]


def verify_many(cases: List[VerifyCase], timeout_s: float = 3600,
                progress: bool = False, device: str = "auto") -> List[VerifyReport]:
    """Check several foldings, sharing process start-up: one single-process reference run for
    all of them, then one spawn of ranks per world size that runs its cases in turn.

    ``device`` (auto, cpu or cuda) is resolved once, for the largest world: the reference and
    every folding run on the same kind of device, so that a difference is the folding's."""
    from tqdm import tqdm

    from folding.run.device import pick_device
    from folding.run.launch import run_ranks

    for case in cases:
        case.load_placement()  # a bad placement file is refused before anything is spawned
    worlds = sorted({c.spec.world_size for c in cases})
    choice = pick_device(device, worlds[-1])
    bar = tqdm(total=1 + len(worlds), desc="verify", unit="run", disable=not progress, leave=False)
    with tempfile.TemporaryDirectory(prefix="folding-verify-") as tmp:
        paths = [os.path.join(tmp, f"reference-{i}.pt") for i in range(len(cases))]
        bar.set_postfix_str("single-process reference")
        run_ranks(_reference_rank, 1, cases, paths, timeout_s=timeout_s, device=choice)
        bar.update()
        results: Dict[int, dict] = {}
        for world in worlds:
            bar.set_postfix_str(f"folded runs on {world} ranks")
            mine = [i for i, c in enumerate(cases) if c.spec.world_size == world]
            per_rank = run_ranks(_folded_rank, world, [cases[i] for i in mine],
                                 [paths[i] for i in mine], timeout_s=timeout_s, device=choice)
            for position, index in enumerate(mine):
                results[index] = [rank_results[position] for rank_results in per_rank]
            bar.update()
        references = [torch.load(p, weights_only=False, map_location="cpu")["steps"]
                      for p in paths]
    bar.close()
    return [_report(case, references[i], results[i], choice) for i, case in enumerate(cases)]


def _report(case: VerifyCase, reference: list, results: list,
            device: Optional[DeviceChoice] = None) -> VerifyReport:
    ranks = [r["steps"] for r in results]
    drops = DropCheck(compared=sum(r["drops"].compared for r in results),
                      near_ties=sum(r["drops"].near_ties for r in results),
                      mismatches=[m for r in results for m in r["drops"].mismatches])
    comparisons = []
    for step in range(case.steps):
        losses = {r[step]["loss"] for r in ranks}
        ref_loss = reference[step]["loss"]
        folded_loss = max(losses, key=lambda l: abs(l - ref_loss))
        comparisons.append(StepComparison(
            step=step, loss_reference=ref_loss, loss_folded=folded_loss,
            loss_rel_diff=abs(folded_loss - ref_loss) / abs(ref_loss),
            grad_rel_diff=_relative_by_tensor([r[step]["grads"] for r in ranks]),
            param_rel_diff=_relative_by_tensor([r[step]["params"] for r in ranks])))
    return VerifyReport(case, comparisons, drops, results[0]["traffic"], device)
