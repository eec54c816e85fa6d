"""Per-rank parameters and gradient buffers against Megatron-Core's own GPTModel and DDP.

Megatron builds the model chunk of one rank of a folded layout in a single process: torch's
``fake`` process-group backend stands in for the other ranks (construction needs group sizes and
ranks, never data), ``initialize_model_parallel`` builds the real folded groups, and GPTModel is
built with the local layer spec on the CPU without initialising weights. Every parameter's name,
shape and kind (Megatron's ``allreduce=False`` marks expert parameters) must equal ours. The
chunks are then wrapped in Megatron's DistributedDataParallel (as training does: Float16Module
first for bf16), and each gradient buffer's size, buckets and the data-parallel rank's optimizer
shard (from the distributed optimizer's own range map) must equal our layout's.

The probe runs in a subprocess (this file run as a script) so its process groups never touch the
test process.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from folding.cost.memory import (WeightMemory, exact_weight_memory, grad_buffer_layout,
                                 rank_grad_buffers)
from folding.layout.parameters import (ParameterModel, count_by_kind, expert_gradients_over_edp,
                                       padded_vocab_size, rank_parameter_counts, rank_parameters)
from folding.mesh import FoldingSpec
from folding.recipe import ModelArch, TrainingSetup

BASE = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=100, ffn_hidden_size=96,
            make_vocab_size_divisible_by=8)


def arch(**kw) -> ModelArch:
    return ModelArch(**{**BASE, **kw})


# (architecture, folding degrees, ranks to probe): dense, MoE, GQA, qk-norm, biases, LayerNorm,
# shared experts with a gate, MoE layer patterns, tied embeddings over PP, learned positions,
# MLA (TP=1 only: the local spec splits MLA's down-projections, the TE spec does not), MTP.
CASES = [
    (arch(), dict(world_size=1), [0]),
    (arch(num_query_groups=2, num_experts=4, moe_ffn_hidden_size=32, moe_router_topk=2),
     dict(world_size=8, tp=2, ep=4, etp=1), [0, 5]),
    (arch(num_query_groups=2, num_experts=8, moe_ffn_hidden_size=32, moe_layer_freq=2,
          moe_shared_expert_intermediate_size=48, moe_shared_expert_gate=True),
     dict(world_size=8, tp=2, pp=2, ep=2, etp=2), [0, 7]),
    (arch(num_experts=4, moe_ffn_hidden_size=16, moe_layer_freq=[0, 1, 1, 0], qk_layernorm=True,
          normalization="LayerNorm", swiglu=False, add_bias_linear=True, kv_channels=8),
     dict(world_size=8, tp=1, pp=2, vpp=2, ep=4, etp=1), [0, 4]),
    (arch(num_query_groups=1, add_qkv_bias=True, untie_embeddings_and_output_weights=False),
     dict(world_size=4, tp=2, pp=2), [0, 3]),
    (arch(untie_embeddings_and_output_weights=False, position_embedding_type="learned_absolute",
          max_position_embeddings=32),
     dict(world_size=1), [0]),
    (arch(multi_latent_attention=True, q_lora_rank=24, kv_lora_rank=16, qk_head_dim=16,
          qk_pos_emb_head_dim=8, v_head_dim=12, qk_layernorm=True, num_experts=4,
          moe_ffn_hidden_size=32, moe_layer_freq=[0, 1, 1, 1], moe_shared_expert_intermediate_size=32,
          mtp_num_layers=1),
     dict(world_size=4, pp=2, ep=2, etp=1), [0, 3]),
    (arch(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8,
          v_head_dim=16, num_experts=2, moe_ffn_hidden_size=32, mtp_num_layers=2),
     dict(world_size=1), [0]),
]


def ours(a: ModelArch, degrees: dict, rank: int):
    spec = FoldingSpec(**degrees, num_experts=a.num_experts, num_layers=a.num_layers,
                       sequence_parallel=degrees.get("tp", 1) > 1)
    pp_rank = spec.coordinates(rank)["attention"]["pp"]
    chunks = [rank_parameters(a, spec, pp_rank, v if spec.vpp else None, max_sequence_length=32)
              for v in range(spec.vpp or 1)]
    return spec, pp_rank, chunks


def probe(requests):
    """Run this file as a script: Megatron's parameters for each (arch, degrees, rank)."""
    out = subprocess.run([sys.executable, __file__], input=json.dumps(requests), text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


MOE = dict(num_query_groups=2, num_experts=4, moe_ffn_hidden_size=32)
# (architecture, degrees, ranks, DDP setup): bucketing, interleaving (later chunks and stages are
# not bucketed), tied embeddings in their own bucket, MLA + MTP in fp32, no distributed
# optimizer, CP (dense gradients over DP x CP), EP = 1 (experts join the dense buffer).
BUFFER_CASES = [
    (arch(**MOE), dict(world_size=8, tp=2, ep=4, etp=1), [3, 6],
     dict(precision="bf16", distributed_optimizer=True, bucket_size=5000)),
    (arch(**MOE), dict(world_size=8, pp=2, vpp=2, ep=4, etp=1), [0, 5],
     dict(precision="bf16", distributed_optimizer=True, bucket_size=3000)),
    (arch(untie_embeddings_and_output_weights=False), dict(world_size=8, tp=2, pp=2), [0, 7],
     dict(precision="bf16", distributed_optimizer=True, bucket_size=2000)),
    (CASES[6][0], dict(world_size=4, pp=2, ep=2, etp=1), [1, 3],
     dict(precision="fp32", distributed_optimizer=True, bucket_size=None)),
    (arch(**MOE), dict(world_size=4, ep=2, etp=1), [0],
     dict(precision="bf16", distributed_optimizer=False, bucket_size=None)),
    (arch(**MOE), dict(world_size=8, tp=2, cp=2, ep=4, etp=1), [5],
     dict(precision="bf16", distributed_optimizer=True, bucket_size=None)),
    (arch(**MOE), dict(world_size=4, tp=2), [1],
     dict(precision="bf16", distributed_optimizer=True, bucket_size=4000)),
]


@pytest.fixture(scope="module")
def megatron_results():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    requests = [dict(arch=dataclasses.asdict(a), degrees=d, rank=r) for a, d, ranks in CASES
                for r in ranks]
    requests += [dict(arch=dataclasses.asdict(a), degrees=d, rank=r, ddp=ddp)
                 for a, d, ranks, ddp in BUFFER_CASES for r in ranks]
    results = probe(requests)
    split = sum(len(ranks) for _, _, ranks in CASES)
    return results[:split], results[split:]


@pytest.fixture(scope="module")
def megatron_parameters(megatron_results):
    return megatron_results[0]


@pytest.fixture(scope="module")
def megatron_buffers(megatron_results):
    return megatron_results[1]


@pytest.mark.megatron
def test_rank_parameters_equal_megatron_gptmodel(megatron_parameters):
    index = 0
    for a, degrees, ranks in CASES:
        for rank in ranks:
            theirs = megatron_parameters[index]
            index += 1
            spec, pp_rank, chunks = ours(a, degrees, rank)
            assert len(chunks) == len(theirs)
            for mine, megatron in zip(chunks, theirs):
                mine_rows = [(p.name, list(p.shape), p.kind,
                              p.kind == "expert" and expert_gradients_over_edp(spec)) for p in mine]
                megatron_rows = [(name, shape, kind, not allreduce)
                                 for name, shape, kind, allreduce, _ in megatron["params"]]
                assert mine_rows == megatron_rows, (degrees, rank)
                shared = [p.name for p in mine if p.shared_embedding]
                assert shared == [name for name, _, _, _, flag in megatron["params"] if flag], (degrees, rank)
            # The memoised counter agrees with the tensor list, chunk by chunk and for the rank.
            model = ParameterModel(a, max_sequence_length=32)
            for v, chunk in enumerate(chunks):
                assert model.chunk_counts(spec, pp_rank, v if spec.vpp else None) == count_by_kind(chunk)
            assert rank_parameter_counts(a, spec, pp_rank, 32) == count_by_kind(
                [p for chunk in chunks for p in chunk])


@pytest.mark.megatron
def test_probe_catches_a_wrong_model(megatron_parameters):
    """The comparison fails when our model is wrong: top-k does not change parameters, but the
    expert hidden size does."""
    a, degrees, ranks = CASES[1]
    wrong = dataclasses.replace(a, moe_ffn_hidden_size=a.moe_ffn_hidden_size + 8)
    _, _, chunks = ours(wrong, degrees, ranks[0])
    mine = [(p.name, list(p.shape), p.kind) for p in chunks[0]]
    first_request_of_case_1 = len(CASES[0][2])
    theirs = [(n, s, k) for n, s, k, _, _ in megatron_parameters[first_request_of_case_1][0]["params"]]
    assert mine != theirs


@pytest.mark.megatron
def test_gradient_buffers_and_optimizer_shards_equal_megatron_ddp(megatron_buffers):
    index = 0
    for a, degrees, ranks, ddp in BUFFER_CASES:
        training = TrainingSetup(seq_length=32, precision=ddp["precision"],
                                 use_distributed_optimizer=ddp["distributed_optimizer"],
                                 overlap_grad_reduce=ddp["bucket_size"] is not None)
        for rank in ranks:
            chunks = megatron_buffers[index]
            index += 1
            theirs = [b for chunk in chunks for b in chunk["buffers"]]
            spec = FoldingSpec(**degrees, num_experts=a.num_experts, num_layers=a.num_layers,
                               sequence_parallel=degrees.get("tp", 1) > 1)
            pp_rank = spec.coordinates(rank)["attention"]["pp"]
            mine = rank_grad_buffers(a, training, spec, pp_rank, bucket_elements=ddp["bucket_size"])
            assert [(b.group, b.numel, [list(r) for r in b.bucket_ranges], b.data_parallel_size)
                    for b in mine] == [
                (b["group"], b["numel"], b["buckets"], b["dp_size"]) for b in theirs], (degrees, rank)
            # Our rank-to-shard mapping uses FoldingSpec's groups; Megatron's is its own.
            for b in theirs:
                mesh = "moe" if b["group"] == "edp" else "attention"
                assert spec.group_of(rank, mesh, b["group"]).index(rank) == b["dp_rank"]
            if ddp["distributed_optimizer"]:
                assert [m.shard_elements(t["dp_rank"]) for m, t in zip(mine, theirs)] == [
                    t["shard"] for t in theirs]
            # Bytes: every parameter in the training dtype, fp32 main gradients, and Adam's fp32
            # master copy (16-bit training only) and two fp32 moments on the owned elements.
            dtype_bytes = {"bfloat16": 2, "float32": 4}
            per_element = 12 if ddp["precision"] == "bf16" else 8
            params = sum(p[1][0] * (p[1][1] if len(p[1]) > 1 else 1) for chunk in chunks
                         for p in chunk["params"])
            expected = WeightMemory(
                params=sum(dtype_bytes[t["param_dtype"]] * (t["param_numel"] or 0) for t in theirs)
                if ddp["distributed_optimizer"] else 2 * params if ddp["precision"] == "bf16" else 4 * params,
                grads=sum(dtype_bytes[t["grad_dtype"]] * t["grad_numel"] for t in theirs),
                optimizer=per_element * (sum(t["shard"] for t in theirs)
                                         if ddp["distributed_optimizer"] else params))
            assert exact_weight_memory(a, training, spec, pp_rank, rank=rank,
                                       bucket_elements=ddp["bucket_size"]) == expected


@pytest.mark.megatron
def test_buffer_check_catches_a_wrong_layout(megatron_buffers):
    """Without the 64-element alignment of parameter starts the layout no longer matches."""
    a, degrees, ranks, ddp = BUFFER_CASES[0]
    spec = FoldingSpec(**degrees, num_experts=a.num_experts)
    params = [p for p in rank_parameters(a, spec, 0) if p.kind != "expert"]
    unaligned = grad_buffer_layout(params, spec.dp * spec.cp, False, ddp["bucket_size"])
    theirs = megatron_buffers[0][0]["buffers"][0]
    assert [list(r) for r in unaligned.bucket_ranges] != theirs["buckets"]


def test_hand_count_of_a_tiny_moe_rank():
    """TP2 EP4 ETP1 on 8 ranks: counts by hand from the layer formulas."""
    a = arch(num_query_groups=2, num_experts=4, moe_ffn_hidden_size=32)
    spec = FoldingSpec(world_size=8, tp=2, ep=4, etp=1, num_experts=4)
    h, d = 64, 16
    vocab = 112  # 100 padded up to a multiple of make_vocab_size_divisible_by (8) x TP (2)
    assert padded_vocab_size(a, 2) == vocab
    attention = (4 + 2 * 2) * d * h // 2 + h * 4 * d // 2
    router = 4 * h
    experts_here = 1 * (2 * 32 * h + h * 32)
    norms = 2 * h
    per_layer_dense = attention + router + norms
    counts = count_by_kind(rank_parameters(a, spec, 0))
    assert counts.expert == 4 * experts_here
    assert counts.dense == 4 * per_layer_dense + h
    assert counts.embedding == 2 * vocab * h // 2


# ----------------------------------------------------------------------------- the probe
def _build(request):
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_decoder_block_spec,
                                                          get_gpt_mtp_block_spec)
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import (MLATransformerConfig,
                                                              TransformerConfig)

    a, d, rank = request["arch"], request["degrees"], request["rank"]
    tp, pp, ep, etp, vpp = d.get("tp", 1), d.get("pp", 1), d.get("ep", 1), d.get("etp"), d.get("vpp")
    etp, cp = etp or tp, d.get("cp", 1)
    dtype = torch.float32 if (request.get("ddp") or {}).get("precision") == "fp32" else torch.bfloat16
    dist.init_process_group("fake", rank=rank, world_size=d["world_size"], store=FakeStore())
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp,
                                 context_parallel_size=cp, create_gloo_process_groups=False)
    kw = dict(num_layers=a["num_layers"], hidden_size=a["hidden_size"],
              num_attention_heads=a["num_attention_heads"], ffn_hidden_size=a["ffn_hidden_size"],
              kv_channels=a["kv_channels"], num_moe_experts=a["num_experts"],
              moe_router_topk=a["moe_router_topk"], moe_ffn_hidden_size=a["moe_ffn_hidden_size"],
              moe_shared_expert_intermediate_size=a["moe_shared_expert_intermediate_size"],
              moe_shared_expert_gate=a["moe_shared_expert_gate"], moe_layer_freq=a["moe_layer_freq"],
              gated_linear_unit=a["swiglu"], normalization=a["normalization"],
              add_bias_linear=a["add_bias_linear"], add_qkv_bias=a["add_qkv_bias"],
              qk_layernorm=a["qk_layernorm"], mtp_num_layers=a["mtp_num_layers"],
              tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
              virtual_pipeline_model_parallel_size=vpp, expert_model_parallel_size=ep,
              expert_tensor_parallel_size=etp, context_parallel_size=cp, pipeline_dtype=dtype,
              params_dtype=dtype, bf16=dtype == torch.bfloat16, use_cpu_initialization=True,
              perform_initialization=False, sequence_parallel=False)
    if a["num_query_groups"]:
        kw["num_query_groups"] = a["num_query_groups"]
    if a["multi_latent_attention"]:
        config = MLATransformerConfig(**kw, multi_latent_attention=True, rope_type="rope",
                                      q_lora_rank=a["q_lora_rank"], kv_lora_rank=a["kv_lora_rank"],
                                      qk_head_dim=a["qk_head_dim"],
                                      qk_pos_emb_head_dim=a["qk_pos_emb_head_dim"],
                                      v_head_dim=a["v_head_dim"])
    else:
        config = TransformerConfig(**kw)
    multiple = a["make_vocab_size_divisible_by"] * tp
    vocab = -(-a["vocab_size"] // multiple) * multiple

    class NoParameters(torch.nn.Module):
        """Stands in for core attention, which has no parameters (the local spec's
        DotProductAttention accepts neither MLA's arguments nor context parallelism)."""

        def __init__(self, *args, **kwargs):
            super().__init__()

    chunks = []
    for v in range(vpp or 1):
        stage = v if vpp else None
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=a["normalization"], vp_stage=stage)
        if a["multi_latent_attention"] or cp > 1:
            for layer_spec in spec.layer_specs:
                layer_spec.submodules.self_attention.submodules.core_attention = NoParameters
        mtp = (get_gpt_mtp_block_spec(config, spec, use_transformer_engine=False, vp_stage=stage)
               if a["mtp_num_layers"] else None)
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        model = GPTModel(config, spec, vocab_size=vocab, max_sequence_length=32,
                         position_embedding_type=a["position_embedding_type"],
                         share_embeddings_and_output_weights=not a["untie_embeddings_and_output_weights"],
                         pre_process=pre, post_process=post, mtp_block_spec=mtp, vp_stage=stage)
        rows = []
        named = list(model.named_parameters())
        buffers = _ddp_buffers(config, model, request.get("ddp"), chunk=v) if request.get("ddp") else []
        for name, p in named:
            # Kinds from Megatron's module tree: routed experts live in MoELayer.experts.
            kind = ("expert" if ".mlp.experts." in name else
                    "embedding" if name.startswith(("embedding.", "output_layer.")) else "dense")
            # megatron-core 0.16 names the MTP layer's transformer layer differently.
            name = name.replace(".transformer_layer.", ".mtp_model_layer.")
            rows.append((name, list(p.shape), kind, bool(getattr(p, "allreduce", True)),
                         bool(getattr(p, "shared_embedding", False))))
        chunks.append({"params": rows, "buffers": buffers})
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return chunks


def _ddp_buffers(config, model, ddp, chunk):
    """Wrap a chunk as training does and describe Megatron's gradient buffers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.transformer.module import Float16Module

    if ddp["precision"] == "bf16":
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=ddp["distributed_optimizer"],
        overlap_grad_reduce=ddp["bucket_size"] is not None, bucket_size=ddp["bucket_size"])
    wrapped = DistributedDataParallel(config, ddp_config, model, disable_bucketing=chunk > 0)
    out = []
    for group, buffers in (("dp_cp", wrapped.buffers), ("edp", wrapped.expert_parallel_buffers)):
        for buf in buffers:
            shard = None
            if ddp["distributed_optimizer"]:
                ranges = DistributedOptimizer._build_gbuf_range_map(buf)
                shard = sum(r["param"].size for per_dtype in ranges.values()
                            for bucket in per_dtype for r in bucket["param_map"].values())
            out.append(dict(group=group, param_dtype=str(buf.param_dtype).replace("torch.", ""),
                            grad_dtype=str(buf.grad_dtype).replace("torch.", ""),
                            numel=buf.numel, grad_numel=buf.grad_data.numel(),
                            param_numel=None if buf.param_data is None else buf.param_data.numel(),
                            buckets=[[b.offset, b.offset + b.grad_data.numel()] for b in buf.buckets],
                            dp_size=buf.data_parallel_world_size,
                            dp_rank=buf.data_parallel_group.rank(), shard=shard))
    return out


def _main():
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    # Model construction on the CPU still asks CUDA for a device in two places that hold no
    # parameters (RoPE frequencies, the initial copy of a shared embedding): answer "cpu".
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:  # megatron-core 0.16 tests isinstance(x, TELinear) with a placeholder when TE is absent
        import megatron.core.transformer.multi_latent_attention as mla

        if not isinstance(getattr(mla, "TELinear", None), type):
            mla.TELinear = type("NoTELinear", (), {})
    except ImportError:
        pass
    requests = json.loads(sys.stdin.read())
    print(json.dumps([_build(r) for r in requests]))


if __name__ == "__main__":
    _main()
