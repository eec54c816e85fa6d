"""The expert placement file: which logical expert each physical slot holds, per MoE layer.

A placement is JSON ``{"num_experts": E, "num_layers": L, "ep_size": P, "slots_per_rank": S,
"gpus_per_node": G, "layers": [[expert of slot 0, ..., expert of slot P*S-1], ...]}`` with one
list per MoE layer. EP rank r holds slots [r*S, (r+1)*S) and lives on node r // G. Without
replicas S = E/P and every expert appears once; with R spare slots per rank S = E/P + R and the
hot experts appear more than once. The token dispatcher loads placements through ``Placement``.

Replica rule (shared by the metrics, the solver and the dispatcher contract): a token sends its
(token, expert) pair to one of the expert's replicas chosen uniformly at random, so each replica
receives an even share of the expert's pairs and every measure of a placement is an expectation
over that choice. ``host_fractions`` gives, per layer, the share of each expert held by each rank.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from folding.errors import FoldingError

PLACEMENT_KEYS = ("num_experts", "num_layers", "ep_size", "slots_per_rank", "gpus_per_node", "layers")


@dataclass(eq=False)
class Placement:
    """Expert-to-slot map of every MoE layer, for one EP group."""

    num_experts: int
    """Logical experts per MoE layer (E)."""
    num_layers: int
    """MoE layers (L)."""
    ep_size: int
    """Expert-parallel ranks (P)."""
    slots_per_rank: int
    """Expert slots on each rank (S = E/P + redundant slots per rank)."""
    gpus_per_node: int
    """Ranks per node (G): rank r lives on node r // G."""
    layers: np.ndarray
    """int64 [L, P*S]: the logical expert held by each slot, per layer."""

    def __post_init__(self) -> None:
        self.layers = np.asarray(self.layers, dtype=np.int64)

    # ------------------------------------------------------------------------------ creation
    @classmethod
    def identity(cls, num_experts: int, num_layers: int, ep_size: int, gpus_per_node: int) -> "Placement":
        """Megatron's default: expert e on rank e // (E/P) in every layer, no replicas."""
        if ep_size < 1 or num_experts % ep_size:
            raise FoldingError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}")
        layers = np.tile(np.arange(num_experts, dtype=np.int64), (num_layers, 1))
        return cls(num_experts, num_layers, ep_size, num_experts // ep_size, gpus_per_node, layers).validate()

    @classmethod
    def from_rank_assignment(cls, num_experts: int, ep_size: int, gpus_per_node: int,
                             item_experts: List[np.ndarray], item_ranks: List[np.ndarray]) -> "Placement":
        """Build a placement from, per layer, the expert and the rank of every item (replica).

        Each rank must receive the same number of items; inside a rank slots are sorted by expert.
        """
        rows = []
        for experts, ranks in zip(item_experts, item_ranks):
            order = np.lexsort((experts, ranks))
            rows.append(np.asarray(experts)[order])
        layers = np.stack(rows)
        return cls(num_experts, len(rows), ep_size, layers.shape[1] // ep_size, gpus_per_node,
                   layers).validate()

    # ------------------------------------------------------------------------------ file I/O
    @classmethod
    def from_json(cls, obj, source: str = "placement") -> "Placement":
        """Parse the JSON object of a placement file; raises FoldingError naming the problem."""
        if not isinstance(obj, dict):
            raise FoldingError(f"{source}: expected a JSON object with keys {', '.join(PLACEMENT_KEYS)}")
        missing = [k for k in PLACEMENT_KEYS if k not in obj]
        if missing:
            raise FoldingError(f"{source}: missing key {missing[0]!r}")
        for key in PLACEMENT_KEYS[:-1]:
            value = obj[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FoldingError(f"{source}: {key} must be a positive integer, not {value!r}")
        if obj["num_experts"] % obj["ep_size"]:
            raise FoldingError(f"{source}: num_experts={obj['num_experts']} is not divisible by "
                               f"ep_size={obj['ep_size']}")
        layers = obj["layers"]
        if not isinstance(layers, list) or not all(isinstance(row, list) for row in layers):
            raise FoldingError(f"{source}: 'layers' must be a list of lists of expert ids")
        if len(layers) != obj["num_layers"]:
            raise FoldingError(f"{source}: 'layers' has {len(layers)} lists but num_layers="
                               f"{obj['num_layers']}")
        for index, row in enumerate(layers):
            bad = [x for x in row if not isinstance(x, int) or isinstance(x, bool)]
            if bad:
                raise FoldingError(f"{source}: layer {index} holds {bad[0]!r}, not an expert id")
        widths = {len(row) for row in layers}
        expected = obj["ep_size"] * obj["slots_per_rank"]
        if len(widths) > 1 or (widths and widths != {expected}):
            index = next(i for i, row in enumerate(layers) if len(row) != expected)
            raise FoldingError(f"{source}: layer {index} has {len(layers[index])} slots but ep_size x "
                               f"slots_per_rank = {obj['ep_size']} x {obj['slots_per_rank']} = {expected}")
        array = np.array(layers, dtype=np.int64).reshape(len(layers), expected)
        placement = cls(obj["num_experts"], obj["num_layers"], obj["ep_size"], obj["slots_per_rank"],
                        obj["gpus_per_node"], array)
        return placement.validate(source=source)

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Placement":
        """Read and validate a placement file."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise FoldingError(f"cannot read placement {path}: {e.strerror or e}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise FoldingError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        return cls.from_json(obj, source=str(path))

    def to_json(self) -> dict:
        return {"num_experts": self.num_experts, "num_layers": self.num_layers, "ep_size": self.ep_size,
                "slots_per_rank": self.slots_per_rank, "gpus_per_node": self.gpus_per_node,
                "layers": self.layers.tolist()}

    def save(self, path: Union[str, Path]) -> None:
        """Write the placement as JSON, one line per layer."""
        obj = self.to_json()
        head = json.dumps({k: v for k, v in obj.items() if k != "layers"})[:-1]
        rows = ",\n  ".join(json.dumps(row) for row in obj["layers"])
        Path(path).write_text(f'{head}, "layers": [\n  {rows}\n]}}\n')

    # ------------------------------------------------------------------------------ checks
    def validate(self, num_experts: Optional[int] = None, num_layers: Optional[int] = None,
                 ep_size: Optional[int] = None, source: str = "placement") -> "Placement":
        """Check the placement on its own and against the expected sizes; returns self.

        Raises FoldingError with one line naming the first problem found.
        """
        E, L, P, S = self.num_experts, self.num_layers, self.ep_size, self.slots_per_rank
        if num_experts is not None and num_experts != E:
            raise FoldingError(f"{source} is for {E} experts but {num_experts} are expected")
        if num_layers is not None and num_layers != L:
            raise FoldingError(f"{source} has {L} MoE layers but {num_layers} are expected")
        if ep_size is not None and ep_size != P:
            raise FoldingError(f"{source} is for ep_size={P} but ep_size={ep_size} is expected")
        if E % P:
            raise FoldingError(f"{source}: num_experts={E} is not divisible by ep_size={P}")
        if S < E // P:
            raise FoldingError(f"{source}: slots_per_rank={S} is below num_experts/ep_size={E // P}, "
                               f"so some experts cannot have a slot")
        if self.layers.ndim != 2 or self.layers.shape[0] != L:
            raise FoldingError(f"{source}: {self.layers.shape[0] if self.layers.ndim else 0} layers "
                               f"listed but num_layers={L}")
        if self.layers.shape[1] != P * S:
            raise FoldingError(f"{source}: {self.layers.shape[1]} slots per layer but ep_size x "
                               f"slots_per_rank = {P} x {S} = {P * S}")
        out_of_range = (self.layers < 0) | (self.layers >= E)
        if out_of_range.any():
            layer, slot = map(int, np.argwhere(out_of_range)[0])
            raise FoldingError(f"{source}: layer {layer}, slot {slot} holds expert "
                               f"{int(self.layers[layer, slot])}, outside [0, {E})")
        counts = self.replica_counts()
        if (counts == 0).any():
            layer, expert = map(int, np.argwhere(counts == 0)[0])
            raise FoldingError(f"{source}: layer {layer}: expert {expert} has no slot")
        return self

    # ------------------------------------------------------------------------------ geometry
    @property
    def num_slots(self) -> int:
        return self.ep_size * self.slots_per_rank

    @property
    def redundant_slots(self) -> int:
        """Spare slots per rank (R), beyond E/P."""
        return self.slots_per_rank - self.num_experts // self.ep_size

    @property
    def num_nodes(self) -> int:
        return math.ceil(self.ep_size / self.gpus_per_node)

    def slot_to_rank(self, slot: int) -> int:
        return int(slot) // self.slots_per_rank

    @property
    def slot_ranks(self) -> np.ndarray:
        """int64 [P*S]: the rank of every slot."""
        return np.arange(self.num_slots) // self.slots_per_rank

    @property
    def rank_nodes(self) -> np.ndarray:
        """int64 [P]: the node of every rank."""
        return np.arange(self.ep_size) // self.gpus_per_node

    def replicas_of(self, layer: int, expert: int) -> List[int]:
        """The slots that hold ``expert`` in ``layer``, in slot order."""
        return np.flatnonzero(self.layers[layer] == expert).tolist()

    def ranks_of(self, layer: int, expert: int) -> List[int]:
        """The ranks that hold ``expert`` in ``layer``, one entry per replica."""
        return [self.slot_to_rank(s) for s in self.replicas_of(layer, expert)]

    def replica_counts(self) -> np.ndarray:
        """int64 [L, E]: how many slots hold each expert, per layer."""
        E = self.num_experts
        flat = (self.layers + E * np.arange(self.num_layers)[:, None]).ravel()
        valid = (self.layers >= 0).ravel() & (self.layers < E).ravel()
        return np.bincount(flat[valid], minlength=E * self.num_layers).reshape(self.num_layers, E)

    def host_fractions(self, layer: int, level: str = "rank") -> np.ndarray:
        """float64 [E, P] (or [E, nodes] for level="node"): the share of each expert's pairs that
        each rank (node) receives under the uniform replica rule. Rows sum to 1."""
        return host_fractions(self.layers[layer], self.num_experts, self.slot_ranks,
                              self.ep_size if level == "rank" else self.num_nodes,
                              None if level == "rank" else self.rank_nodes)

    def moved_fraction(self, previous: "Placement") -> float:
        """Share of slots whose expert must be copied in from elsewhere when switching from
        ``previous``: per layer and rank, the replicas this placement holds beyond those the
        previous one held there, over all slots."""
        if (previous.num_experts, previous.num_layers, previous.ep_size) != (
                self.num_experts, self.num_layers, self.ep_size):
            raise FoldingError("previous placement differs in experts, layers or ep_size")
        new = rank_expert_counts(self.layers, self.slot_ranks, self.ep_size, self.num_experts)
        old = rank_expert_counts(previous.layers, previous.slot_ranks, self.ep_size, self.num_experts)
        return float(np.maximum(new - old, 0).sum() / (self.num_layers * self.num_slots))


def rank_expert_counts(layers: np.ndarray, slot_ranks: np.ndarray, num_ranks: int,
                       num_experts: int) -> np.ndarray:
    """int64 [L, P, E]: replicas of each expert on each rank, per layer."""
    L = layers.shape[0]
    index = (np.arange(L)[:, None] * num_ranks + slot_ranks[None, :]) * num_experts + layers
    return np.bincount(index.ravel(), minlength=L * num_ranks * num_experts).reshape(L, num_ranks, num_experts)


def host_fractions(item_experts: np.ndarray, num_experts: int, item_ranks: np.ndarray,
                   num_hosts: int, rank_nodes: Optional[np.ndarray] = None) -> np.ndarray:
    """float64 [E, hosts]: share of each expert held by each rank (or node, via ``rank_nodes``),
    given the expert and the rank of every replica of one layer."""
    hosts = item_ranks if rank_nodes is None else rank_nodes[item_ranks]
    copies = np.bincount(item_experts * num_hosts + hosts, minlength=num_experts * num_hosts)
    copies = copies.reshape(num_experts, num_hosts).astype(np.float64)
    return copies / np.maximum(copies.sum(axis=1, keepdims=True), 1.0)
