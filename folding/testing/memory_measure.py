"""Measure, inside the ranks of a real folded Megatron model, the bytes that
``folding.cost.memory`` predicts.

Unlike the rest of ``folding.cost`` this module has side effects: it builds Megatron's GPTModel,
DDP and optimizer through ``RankTrainer`` on local ranks (CPU ranks with gloo, or one GPU per rank
with NCCL) and runs them. Nothing in the cost
models imports it. Its functions run inside a rank and return plain numbers:

- ``weight_bytes``: the bytes Megatron allocated for parameters (each distinct storage once: with
  the distributed optimizer that is DDP's padded parameter buffer), for gradients (every
  ``grad_data`` of ``ddp.buffers`` and ``ddp.expert_parallel_buffers``, padding included) and for
  optimizer state (Adam's ``exp_avg`` and ``exp_avg_sq`` and the fp32 master weights the optimizer
  keeps apart from the model's parameters; with the distributed optimizer, this rank's shards).
  Adam's per-tensor ``step`` counters are left out, as in the model.
- ``saved_activation_bytes``: the bytes of the tensors autograd saves for the backward pass
  while a forward runs, seen through ``torch.autograd.graph.saved_tensors_hooks``: every tensor
  a built-in operation or a custom autograd Function (Megatron's linear layers, cross entropy)
  packs for backward, each storage counted once (a saved view keeps its whole storage alive),
  parameter storages excluded. That is what the activation model counts: tensors kept from the
  forward until the backward, not short-lived buffers or the allocator's peak.
- ``measure_cases``: the rank body that builds each ``Case`` in turn, steps it once and measures.

``python -m folding.testing.memory_measure [--device auto|cpu|cuda]`` runs ``default_cases()`` on 8
local ranks and prints each measurement next to the memory model's prediction. The activation
predictions are those of the CPU's local kernels, which a GPU run without Transformer Engine
uses too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Tuple

import torch

WEIGHT_STEP_SEQ_LENGTH = 32
"""Sequence length of the one training step that makes the optimizer allocate its state."""
WEIGHT_STEP_MICRO_BATCHES = 2
"""Micro-batches per data-parallel rank in that step (pipelined foldings need more than one)."""
RUNTIME_ARCHITECTURE = dict(make_vocab_size_divisible_by=1)
"""How the runtime's model differs from the recipe's description of Megatron's training:
``build_model_chunks`` gives GPTModel the vocabulary size as it is, where Megatron's training
first pads it to a multiple of make_vocab_size_divisible_by x TP (for tiny-moe's 256 bytes that
matters from TP4 on). The model is told so."""


@dataclass
class Case:
    """One folding of a recipe, built on every rank, and what to measure on it."""

    degrees: Dict[str, int]
    """Folding degrees over the recipe's (FoldingSpec fields: tp, pp, vpp, ep, etp, ...)."""
    precision: str = "fp32"
    distributed_optimizer: bool = False
    activation_shapes: Tuple[Tuple[int, int], ...] = ()
    """(sequence length, micro-batch size) of each single micro-batch forward to measure."""
    model: Dict[str, Any] = field(default_factory=dict)
    """Architecture fields over the recipe's (e.g. a hidden size whose norms need buffer padding)."""
    recipe: str = "tiny-moe"

    def load(self):
        """The recipe with this case's folding, and the architecture the runtime builds."""
        from folding.recipe import load_recipe

        recipe = load_recipe(self.recipe, **self.degrees)
        model = dataclasses.replace(recipe.model, **{**RUNTIME_ARCHITECTURE, **self.model})
        return dataclasses.replace(recipe, model=model)

    def training(self, seq_length: int = WEIGHT_STEP_SEQ_LENGTH, micro_batch_size: int = 1,
                 micro_batches: int = WEIGHT_STEP_MICRO_BATCHES):
        """The recipe's training setup with this case's precision and optimizer, for batches of
        ``micro_batches`` x ``micro_batch_size`` sequences per data-parallel rank."""
        recipe = self.load()
        return dataclasses.replace(
            recipe.training, precision=self.precision,
            use_distributed_optimizer=self.distributed_optimizer, seq_length=seq_length,
            micro_batch_size=micro_batch_size,
            global_batch_size=recipe.folding.dp * micro_batches * micro_batch_size)

    @property
    def name(self) -> str:
        spec = self.load().folding
        extra = "".join(f" {k}={v}" for k, v in self.model.items())
        optimizer = "distributed" if self.distributed_optimizer else "plain"
        return f"{spec.describe()} {self.precision} {optimizer}{extra}"


@dataclass(frozen=True)
class WeightBytes:
    """Bytes one rank allocated for its training state."""

    params: int
    grads: int
    optimizer: int
    master_weights: int
    """The part of ``optimizer`` that is fp32 copies of the parameters."""


# ----------------------------------------------------------------------------- weights
def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _distinct_storage_bytes(tensors: Iterable[torch.Tensor], skip: Iterable[int] = ()) -> int:
    skipped = set(skip)
    storages = {}
    for t in tensors:
        key = _storage_key(t)
        if key not in skipped:
            storages[key] = t.untyped_storage().nbytes()
    return sum(storages.values())


def chunk_parameters(chunks) -> List[torch.nn.Parameter]:
    return [p for chunk in chunks for p in chunk.parameters()]


def _inner_optimizers(optimizer) -> list:
    """The torch optimizers under Megatron's (chained) optimizer."""
    return [opt.optimizer for opt in getattr(optimizer, "chained_optimizers", [optimizer])]


def weight_bytes(chunks, ddp, optimizer) -> WeightBytes:
    """Parameters, gradient buffers and optimizer state of one rank, from Megatron's objects.
    Call it after at least one optimizer step (Adam allocates its moments lazily)."""
    params = chunk_parameters(chunks)
    param_storages = {_storage_key(p) for p in params}
    grads = sum(buffer.grad_data.numel() * buffer.grad_data.element_size()
                for wrapped in ddp
                for buffer in list(wrapped.buffers) + list(wrapped.expert_parallel_buffers))
    optimized, moments = [], []
    for inner in _inner_optimizers(optimizer):
        for group in inner.param_groups:
            for p in group["params"]:
                optimized.append(p)
                state = inner.state.get(p, {})
                moments += [state[k] for k in ("exp_avg", "exp_avg_sq") if k in state]
    # Optimizer parameters that live in the model's storages are the model's own weights (fp32
    # training, or fp32 shards viewing the parameter buffer); any others are master copies.
    master = _distinct_storage_bytes(optimized, skip=param_storages)
    return WeightBytes(params=_distinct_storage_bytes(params), grads=grads,
                       optimizer=master + _distinct_storage_bytes(moments), master_weights=master)


def parameter_elements_by_kind(chunks) -> Dict[str, int]:
    """Parameter elements of the rank by the cost model's kinds, read off Megatron's module
    names: routed experts live under ``mlp.experts``, embeddings in ``embedding`` and
    ``output_layer``."""
    totals = {"dense": 0, "expert": 0, "embedding": 0}
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            kind = ("expert" if ".mlp.experts." in name else
                    "embedding" if name.startswith(("embedding.", "output_layer.")) else "dense")
            totals[kind] += p.numel()
    return totals


# ----------------------------------------------------------------------------- activations
def saved_activation_bytes(run: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()
                           ) -> Tuple[Any, int]:
    """Run ``run()`` and return (its result, bytes of the storages autograd saved for backward
    meanwhile), counting each storage once and leaving out the storages of ``exclude``."""
    excluded = {_storage_key(t) for t in exclude}
    kept: Dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in excluded and key not in kept:
            kept[key] = storage  # held, so no later allocation can reuse the address
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storage.nbytes() for storage in kept.values())


@contextlib.contextmanager
def expert_token_counts(chunks) -> Iterator[List[int]]:
    """Token copies each MoE layer's local experts receive, in call order, while active."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    counts: List[int] = []

    def record(module, args):
        counts.append(int(args[0].shape[0]))

    handles = [m.experts.register_forward_pre_hook(record)
               for chunk in chunks for m in chunk.modules() if isinstance(m, MoELayer)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def forward_activation_bytes(trainer, micro_batch: Dict[str, torch.Tensor]) -> Tuple[int, List[int]]:
    """Saved-for-backward bytes of one micro-batch's forward (loss included) through the first
    model chunk, and the token copies its experts received per MoE layer. PP = 1 only."""
    if len(trainer.ddp) != 1 or trainer.spec.pp != 1:
        raise ValueError("one forward through one model chunk measures PP = 1 foldings only")
    model = trainer.ddp[0]
    with expert_token_counts(trainer.chunks) as tokens:
        loss, saved = saved_activation_bytes(
            lambda: model(micro_batch["tokens"], micro_batch["position_ids"], None,
                          labels=micro_batch["labels"]),
            exclude=chunk_parameters(trainer.chunks))
    del loss  # frees the graph
    return saved, list(tokens)


# ----------------------------------------------------------------------------- rank body
def _micro_batches(spec, rank: int, seq_length: int, micro_batch_size: int, count: int, corpus,
                   step: int = 0, device=None):
    from folding.run.corpus import micro_batches

    batch = corpus.global_batch(1234 + step, 0, spec.dp * count * micro_batch_size, seq_length,
                                device)
    dp_rank = spec.coordinates(rank)["attention"]["dp"]
    # Own storage for every tensor: a slice of the global batch would keep all of it alive.
    return [{k: v.clone() for k, v in mb.items()}
            for mb in micro_batches(batch, dp_rank, spec.dp, count, micro_batch_size)]


def measure_case(rank: int, case: Case) -> Dict[str, Any]:
    """Build ``case`` on this rank, take one training step, and measure weights and forwards."""
    from folding.run.corpus import ByteCorpus
    from folding.run.rank_trainer import RankTrainer

    recipe = case.load()
    spec = recipe.folding
    training = case.training()
    trainer = RankTrainer(recipe.model, training, spec)
    corpus = ByteCorpus(training.data)
    trainer.step(_micro_batches(spec, rank, WEIGHT_STEP_SEQ_LENGTH, 1, WEIGHT_STEP_MICRO_BATCHES,
                                corpus, device=trainer.device))
    weights = weight_bytes(trainer.chunks, trainer.ddp, trainer.optimizer)
    activations = []
    for seq_length, micro_batch_size in case.activation_shapes:
        micro_batch = _micro_batches(spec, rank, seq_length, micro_batch_size, 1, corpus,
                                     step=seq_length + micro_batch_size,
                                     device=trainer.device)[0]
        saved, tokens = forward_activation_bytes(trainer, micro_batch)
        activations.append({"seq_length": seq_length, "micro_batch_size": micro_batch_size,
                            "bytes": saved, "expert_tokens": tokens})
    elements = parameter_elements_by_kind(trainer.chunks)
    trainer.close()
    return {"rank": rank, "pp_rank": spec.coordinates(rank)["attention"]["pp"],
            "weights": dataclasses.asdict(weights), "elements": elements,
            "activations": activations}


def measure_cases(rank: int, world_size: int, cases: List[Case]) -> List[Dict[str, Any]]:
    """Rank body for ``folding.run.launch.run_ranks``: every case in turn, process groups destroyed
    between them."""
    from folding.megatron.cpu_runtime import enable
    from folding.megatron.groups import destroy

    enable()
    out = []
    for case in cases:
        out.append(measure_case(rank, case))
        destroy()
    return out


def run_cases(cases: List[Case], world_size: int = 8, timeout_s: float = 900,
              device=None) -> List[List[Dict]]:
    """Measure every case on ``world_size`` local ranks (one spawn): result[case][rank].
    ``device`` is a ``folding.run.device.DeviceChoice``; the CPU with gloo when None."""
    from folding.run.device import CPU
    from folding.run.launch import run_ranks

    per_rank = run_ranks(measure_cases, world_size, cases, timeout_s=timeout_s,
                         device=device or CPU)
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(cases))]


# ----------------------------------------------------------------------------- predictions
def expert_load(case: Case, seq_length: int, micro_batch_size: int, tokens: List[int]) -> float:
    """Token copies a rank's experts received over the even share the model assumes (1.0),
    averaged over its MoE layers."""
    from folding.cost.memory import ActivationOptions, token_shape

    recipe = case.load()
    training = case.training(seq_length, micro_batch_size, micro_batches=1)
    even = token_shape(recipe.model, training, recipe.folding, ActivationOptions()).expert_tokens
    return sum(tokens) / (len(tokens) * even) if tokens else 1.0


def predicted_activation_bytes(case: Case, seq_length: int, micro_batch_size: int,
                               load: float = 1.0) -> int:
    """The memory model's saved activations of one micro-batch on the CPU's local kernels."""
    from folding.cost.memory import ActivationOptions, stage_memory

    recipe = case.load()
    training = case.training(seq_length, micro_batch_size, micro_batches=1)
    options = ActivationOptions(attention_kernel="unfused", fused_elementwise=False,
                                moe_load_imbalance=load, recompute="none")
    return stage_memory(recipe.model, training, recipe.folding, 0, options).activations


def predicted_weight_bytes(case: Case, rank: int, pp_rank: int):
    from folding.cost.memory import exact_weight_memory

    recipe = case.load()
    return exact_weight_memory(recipe.model, case.training(), recipe.folding, pp_rank, rank=rank)


# ----------------------------------------------------------------------------- the default set
WEIGHT_FOLDINGS = (
    dict(tp=2, ep=4, etp=1),
    dict(tp=1, ep=8),
    dict(tp=4, ep=2, etp=2),
    dict(tp=2, pp=2, ep=4, etp=1),
    dict(tp=2, pp=2, vpp=2, ep=2, etp=2),
    dict(tp=1, ep=1),
    dict(tp=2, ep=4, etp=2),
)
"""Every folding is measured in fp32 with the plain and with the distributed optimizer."""
BF16_FOLDINGS = (dict(tp=2, ep=4, etp=1), dict(tp=2, pp=2, vpp=2, ep=2, etp=2))
"""bf16 (Float16Module, fp32 main gradients and master weights) with both optimizers."""
PADDED_MODEL = dict(hidden_size=80)
"""tiny-moe's tensors are all multiples of 64 elements, so its buffers need no padding; with
hidden size 80 every norm weight is padded to 128 elements under the distributed optimizer."""
ACTIVATION_SHAPES = {
    "TP2 EP4 ETP1": (dict(tp=2, ep=4, etp=1), ((128, 1), (256, 1), (128, 2), (256, 2))),
    "TP1 EP8": (dict(tp=1, ep=8), ((128, 1), (256, 1), (128, 2), (256, 2))),
    "TP1 EP1": (dict(tp=1, ep=1), ((128, 1), (256, 2))),
    "TP2 EP4 ETP2": (dict(tp=2, ep=4, etp=2), ((128, 1), (256, 2))),
}
"""(sequence length, micro-batch size) forwards measured per folding, in fp32."""


def default_cases() -> List[Case]:
    """The foldings, precisions and forwards the runtime checks measure."""
    forwards = [(degrees, shapes) for degrees, shapes in ACTIVATION_SHAPES.values()]
    cases = []
    for degrees in WEIGHT_FOLDINGS:
        shapes = next((s for d, s in forwards if d == degrees), ())
        cases.append(Case(degrees, "fp32", False, shapes))
        cases.append(Case(degrees, "fp32", True))
    for degrees in BF16_FOLDINGS:
        cases += [Case(degrees, "bf16", False), Case(degrees, "bf16", True)]
    cases += [Case(dict(tp=2, ep=4, etp=1), precision, True, model=PADDED_MODEL)
              for precision in ("fp32", "bf16")]
    return cases


def activation_ratios(case: Case, ranks: List[Dict], index: int) -> List[Tuple[float, int, int, float]]:
    """(measured / predicted, measured, predicted, expert load) of forward ``index`` on every
    rank, each predicted for the tokens that rank's experts received."""
    seq, mbs = case.activation_shapes[index]
    out = []
    for r in ranks:
        m = r["activations"][index]
        load = expert_load(case, seq, mbs, m["expert_tokens"])
        predicted = predicted_activation_bytes(case, seq, mbs, load)
        out.append((m["bytes"] / predicted, m["bytes"], predicted, load))
    return out


def main(argv=None) -> int:
    import argparse
    import sys

    from folding.errors import FoldingError
    from folding.run.device import DEVICES, pick_device

    parser = argparse.ArgumentParser(
        prog="python -m folding.testing.memory_measure",
        description="Measure the memory of real folded models against the memory model.")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="cuda (one GPU per rank, NCCL), cpu (gloo) or auto (cuda when there "
                             "are as many GPUs as ranks, else cpu; the default)")
    args = parser.parse_args(argv)
    world_size = 8  # the world of every default case (tiny-moe's)
    try:
        device = pick_device(args.device, world_size)
    except FoldingError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(f"device: {device.reason}")
    cases = default_cases()
    results = run_cases(cases, world_size=world_size, device=device)
    print("Weights: bytes Megatron allocated vs exact_weight_memory, on every rank")
    exact = 0
    for case, ranks in zip(cases, results):
        differing = []
        for r in ranks:
            predicted = predicted_weight_bytes(case, r["rank"], r["pp_rank"])
            m = r["weights"]
            if (m["params"], m["grads"], m["optimizer"]) != (predicted.params, predicted.grads,
                                                              predicted.optimizer):
                differing.append(r["rank"])
        exact += not differing
        m = ranks[0]["weights"]
        verdict = "exact on every rank" if not differing else f"DIFFERS on ranks {differing}"
        print(f"  {case.name:<58} rank 0: params {m['params']:>8} grads {m['grads']:>8} "
              f"optimizer {m['optimizer']:>8}  {verdict}")
    print(f"  exact on {exact} of {len(cases)} cases")
    print("Activations saved by one micro-batch's forward (fp32, local kernels), predicted for "
          "the tokens each rank's experts received: the busiest rank, and the ratio furthest "
          "from 1 over all ranks")
    for case, ranks in zip(cases, results):
        for i, (seq, mbs) in enumerate(case.activation_shapes):
            ratios = activation_ratios(case, ranks, i)
            ratio, measured, predicted, load = max(ratios, key=lambda x: x[1])
            worst = max(ratios, key=lambda x: abs(x[0] - 1))[0]
            even = measured / predicted_activation_bytes(case, seq, mbs)
            print(f"  {case.load().folding.describe():<32} seq {seq:>3} mbs {mbs}: measured "
                  f"{measured:>8} predicted {predicted:>8} ratio {ratio:.3f} (expert load "
                  f"{load:.2f}; for even routing {even:.3f}); furthest rank {worst:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
