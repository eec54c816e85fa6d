"""Recipes: a model architecture, a training setup and a folding, read from YAML.

A recipe file (recipes/<name>.yaml) has four top-level keys: ``name``, ``description``,
``model``, ``training`` and ``folding`` (plus optional ``source`` and ``notes``). Field names
follow Megatron's pretrain_gpt.py arguments with dashes turned into underscores, so a recipe maps
onto Megatron flags one to one. Unknown keys are refused with their name, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from folding.errors import FoldingError
from folding.mesh import FoldingSpec

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class ModelArch:
    """Architecture of a GPT model with MoE layers, in Megatron's terms."""

    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Model width."""
    num_attention_heads: int
    """Query heads."""
    vocab_size: int
    """Vocabulary size before Megatron's padding."""
    ffn_hidden_size: int
    """Hidden size of dense MLP layers (and of experts unless moe_ffn_hidden_size is set)."""
    num_query_groups: Optional[int] = None
    """Key/value heads for grouped-query attention; None means multi-head attention."""
    kv_channels: Optional[int] = None
    """Head dimension; None means hidden_size / num_attention_heads."""
    num_experts: Optional[int] = None
    """Routed experts per MoE layer; None for a dense model."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: Optional[int] = None
    """Hidden size of each routed expert; None means ffn_hidden_size."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Total hidden size of the shared experts, if any."""
    moe_layer_freq: Union[int, List[int]] = 1
    """MoE every k-th layer (int) or a 0/1 pattern per layer (list), as Megatron's --moe-layer-freq."""
    moe_router_load_balancing_type: str = "aux_loss"
    """Megatron load-balancing loss: aux_loss, seq_aux_loss, none."""
    moe_aux_loss_coeff: float = 1e-2
    """Weight of the load-balancing loss."""
    moe_router_score_function: str = "softmax"
    """Router score function: softmax or sigmoid."""
    moe_router_pre_softmax: bool = False
    """Softmax before top-k (Mixtral) instead of after."""
    swiglu: bool = True
    """Gated SiLU MLPs (fc1 holds the gate and up projections)."""
    normalization: str = "RMSNorm"
    """RMSNorm or LayerNorm."""
    position_embedding_type: str = "rope"
    """rope or learned_absolute."""
    rotary_base: int = 10000
    """RoPE base."""
    max_position_embeddings: Optional[int] = None
    """Longest sequence the position embedding supports; None means the training seq_length."""
    untie_embeddings_and_output_weights: bool = True
    """Separate output layer instead of reusing the embedding."""
    add_bias_linear: bool = False
    """Biases in linear layers."""
    qk_layernorm: bool = False
    """Normalise queries and keys (Qwen3)."""
    multi_latent_attention: bool = False
    """DeepSeek's MLA; see the MLA fields below."""
    q_lora_rank: Optional[int] = None
    """MLA: rank of the query down-projection (None: no query compression)."""
    kv_lora_rank: Optional[int] = None
    """MLA: rank of the key/value down-projection."""
    qk_head_dim: Optional[int] = None
    """MLA: query/key head dimension without the rotary part."""
    qk_pos_emb_head_dim: Optional[int] = None
    """MLA: rotary part of the query/key head dimension."""
    v_head_dim: Optional[int] = None
    """MLA: value head dimension."""
    mtp_num_layers: Optional[int] = None
    """Multi-token-prediction layers (DeepSeek-V3)."""
    add_qkv_bias: bool = False
    """Biases on the query/key/value projection only (Qwen2)."""
    moe_shared_expert_gate: bool = False
    """A sigmoid gate (one weight vector) scales the shared experts' output (Qwen2-MoE)."""
    moe_router_topk_scaling_factor: Optional[float] = None
    """Factor applied to the routing weights after top-k (DeepSeek-V3: 2.5)."""
    moe_router_num_groups: Optional[int] = None
    """Group-limited routing: expert groups per MoE layer (DeepSeek-V3: 8)."""
    moe_router_group_topk: Optional[int] = None
    """Group-limited routing: groups each token may use (DeepSeek-V3: 4)."""
    moe_router_enable_expert_bias: bool = False
    """Auxiliary-loss-free balancing with a per-expert bias (DeepSeek-V3)."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities (Megatron's own default is 0.1; MoE recipes use 0)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches (Megatron's own default is 0.1; MoE recipes use 0)."""
    make_vocab_size_divisible_by: int = 128
    """Megatron pads the vocabulary to a multiple of this times TP."""

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    def moe_ordinals(self) -> Dict[int, int]:
        """{Megatron layer number (1-based): index among the MoE layers} for every MoE layer."""
        pattern = self.moe_layer_pattern()
        return {layer + 1: sum(pattern[:layer]) for layer in range(self.num_layers) if pattern[layer]}

    def moe_layer_pattern(self) -> List[int]:
        """1 for each MoE layer, 0 for each dense layer (Megatron's --moe-layer-freq semantics)."""
        if self.num_experts is None:
            return [0] * self.num_layers
        if isinstance(self.moe_layer_freq, int):
            return [1 if i % self.moe_layer_freq == 0 else 0 for i in range(self.num_layers)]
        if len(self.moe_layer_freq) != self.num_layers:
            raise FoldingError(f"moe_layer_freq lists {len(self.moe_layer_freq)} layers, "
                               f"num_layers={self.num_layers}")
        return list(self.moe_layer_freq)


@dataclass
class TrainingSetup:
    """How the model is trained, in Megatron's terms."""

    seq_length: int
    """Tokens per sequence."""
    micro_batch_size: int = 1
    """Sequences per micro-batch per data-parallel rank."""
    global_batch_size: int = 256
    """Sequences per optimizer step over all data-parallel ranks."""
    train_iters: int = 1000
    """Optimizer steps."""
    lr: float = 1e-4
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay."""
    lr_warmup_iters: int = 0
    """Linear warm-up steps."""
    lr_decay_style: str = "cosine"
    """constant, linear or cosine."""
    weight_decay: float = 0.1
    """AdamW weight decay."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Gradient clipping by global norm; 0 disables it."""
    init_method_std: float = 0.02
    """Standard deviation of the weight initialisation."""
    precision: str = "bf16"
    """bf16, fp16 or fp32."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (DP for dense, EDP for expert parameters)."""
    recompute: str = "none"
    """Activation recomputation: none, selective or full."""
    moe_token_dispatcher_type: str = "alltoall"
    """allgather, alltoall, flex, or folded (this project's dispatcher)."""
    moe_grouped_gemm: bool = True
    """Grouped GEMM for the experts of a rank (GPU)."""
    moe_expert_capacity_factor: Optional[float] = None
    """Token capacity per expert as a multiple of the even share; None means dropless."""
    moe_token_drop_policy: str = "probs"
    """Which tokens an over-full expert drops: probs (lowest routing weight) or position."""
    moe_pad_expert_input_to_capacity: bool = False
    """Pad every expert's input to its capacity."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduction with the backward pass (GPU)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with the forward pass (GPU)."""
    log_interval: int = 10
    """Steps between log lines."""
    seed: int = 1234
    """Random seed."""
    data: Optional[str] = None
    """Training text for CPU recipes (a path inside the package or repository); None: user data."""


@dataclass
class Recipe:
    name: str
    description: str
    model: ModelArch
    training: TrainingSetup
    folding: FoldingSpec
    source: Optional[str] = None
    notes: Optional[str] = None
    path: Optional[Path] = field(default=None, compare=False)


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise FoldingError(f"{where}: expected a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise FoldingError(f"{where}: unknown key {unknown[0]!r}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data]
    if missing:
        raise FoldingError(f"{where}: missing key {missing[0]!r}")
    return cls(**data)


def recipe_path(name_or_path: str) -> Path:
    """A recipe file from a path, or from a name in recipes/ ("mixtral-8x22b")."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise FoldingError(f"recipe file {name_or_path} does not exist")
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        raise FoldingError(f"no recipe named {name_or_path!r}; known: {', '.join(list_recipes())}")
    return candidate


def list_recipes() -> List[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str, **folding_overrides) -> Recipe:
    """Read and validate a recipe; ``folding_overrides`` replace degrees of its folding."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise FoldingError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return recipe_from_dict(data, str(path), path=path, **folding_overrides)


def recipe_from_dict(data: Dict[str, Any], where: str = "recipe", path: Optional[Path] = None,
                     **folding_overrides) -> Recipe:
    if not isinstance(data, dict):
        raise FoldingError(f"{where}: expected a mapping at the top level")
    top = {"name", "description", "model", "training", "folding", "source", "notes"}
    unknown = sorted(set(data) - top)
    if unknown:
        raise FoldingError(f"{where}: unknown key {unknown[0]!r}")
    for key in ("name", "model", "training", "folding"):
        if key not in data:
            raise FoldingError(f"{where}: missing key {key!r}")
    model = _build(ModelArch, data["model"], f"{where}: model")
    training = _build(TrainingSetup, data["training"], f"{where}: training")
    folding_data = dict(data["folding"] or {})
    folding_data.update({k: v for k, v in folding_overrides.items() if v is not None})
    model_facts = dict(num_experts=model.num_experts, num_layers=model.num_layers,
                       num_attention_heads=model.num_attention_heads,
                       num_query_groups=model.query_groups)
    allowed = {f.name for f in dataclasses.fields(FoldingSpec)} - set(model_facts)
    unknown = sorted(set(folding_data) - allowed)
    if unknown:
        raise FoldingError(f"{where}: folding: unknown key {unknown[0]!r}")
    folding = FoldingSpec(**folding_data, **model_facts)
    return Recipe(name=data["name"], description=data.get("description", ""), model=model,
                  training=training, folding=folding, source=data.get("source"),
                  notes=data.get("notes"), path=path)
