"""The Megatron-Core functions the CPU runtime replaces, each with the reason.

``apply(patcher)`` installs them; the patcher restores the originals when the runtime stops.
"""

from __future__ import annotations

import copy

import torch


def _maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
    # Megatron converts split sizes to numpy only for CUDA tensors; CPU tensors must be
    # converted too, or all_to_all_single receives tensors as split sizes.
    if torch.is_tensor(tensor):
        # Non-blocking where the tensor is (or, under folding.testing.host_waits, stands for) a
        # GPU tensor, as Megatron copies it.
        tensor = tensor.to("cpu", non_blocking=tensor.is_cuda)
        if as_numpy:
            tensor = tensor.numpy()
    return tensor


def _get_rng_state(device="cuda", clone=False, graph_safe=False):
    # The "CUDA" generator of the CPU runtime is the CPU default generator.
    return torch.get_rng_state()


def _set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _sequence_parallel_torch_norm(original_new):
    """WrappedTorchNorm refuses sequence parallel, yet a norm needs nothing special for it: its
    weight gradient is a partial sum on each TP rank, which finalize_model_grads all-reduces over
    TP for every parameter marked ``sequence_parallel`` (as Transformer Engine's norms are)."""

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        without_sp = copy.copy(config)
        without_sp.sequence_parallel = False
        norm = original_new(cls, without_sp, hidden_size, eps, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    return staticmethod(__new__)


def _gloo_tolerant_all_gather(original):
    """NCCL gathers tensors of different sizes; gloo refuses. Pad to the largest, gather, trim:
    no arithmetic, so the result is bit-identical."""

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        sizes = [t.shape for t in tensor_list]
        if all(s == tensor.shape for s in sizes):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(s[0] for s in sizes)
        padded = torch.zeros((longest,) + tuple(tensor.shape[1:]), dtype=tensor.dtype)
        padded[: tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original(gathered, padded, group=group)
        for out, full in zip(tensor_list, gathered):
            out.copy_(full[: out.shape[0]])
        return None

    return all_gather


def _type_as_cuda(original):
    """Megatron's gradient clipping and distributed optimizer check ``tensor.type()`` strings
    for CUDA types; on the CPU runtime a CPU tensor answers with its CUDA twin's name."""

    def tensor_type(self, *args, **kwargs):
        name = original(self, *args, **kwargs)
        if not args and not kwargs and isinstance(name, str) and name.startswith("torch.") \
                and not name.startswith("torch.cuda."):
            return "torch.cuda." + name[len("torch."):]
        return name

    return tensor_type


def _pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
    """Megatron's selection of this CP rank's two chunks of the rotary table, without the pinned
    host buffer it builds the index in (pinning needs an accelerator)."""
    from folding.context_parallel.layout import rank_chunks

    if cp_group is None:
        raise ValueError("cp_group must be provided to get positional embedding per CP rank")
    cp_size, cp_rank = cp_group.size(), cp_group.rank()
    index = torch.tensor(rank_chunks(cp_size, cp_rank), device=pos_emb.device)
    pos_emb = pos_emb.view(*pos_emb.shape[:seq_dim], 2 * cp_size, -1, *pos_emb.shape[(seq_dim + 1):])
    pos_emb = pos_emb.index_select(seq_dim, index)
    return pos_emb.view(*pos_emb.shape[:seq_dim], -1, *pos_emb.shape[(seq_dim + 2):])


# Tags for pipeline messages: activations flow to the next stage, gradients to the previous.
_FORWARD_TAG, _BACKWARD_TAG = 1, 2


def _tagged_batched_p2p_ops(*, tensor_send_prev, tensor_recv_prev, tensor_send_next,
                            tensor_recv_next, group, prev_pipeline_rank, next_pipeline_rank):
    """Megatron's batched pipeline exchange, with a tag per direction.

    With two pipeline stages (or interleaving that wraps around) the previous and next rank are
    the same peer; gloo matches untagged messages to one peer in posting order, so an activation
    can land in the buffer meant for a gradient. Tagging by direction pairs each send with the
    receive it is meant for.
    """
    dist = torch.distributed
    ops = []
    for op, tensor, peer, tag in ((dist.isend, tensor_send_prev, prev_pipeline_rank, _BACKWARD_TAG),
                                  (dist.irecv, tensor_recv_prev, prev_pipeline_rank, _FORWARD_TAG),
                                  (dist.isend, tensor_send_next, next_pipeline_rank, _FORWARD_TAG),
                                  (dist.irecv, tensor_recv_next, next_pipeline_rank, _BACKWARD_TAG)):
        if tensor is not None:
            ops.append(dist.P2POp(op, tensor, peer, group, tag))
    return dist.batch_isend_irecv(ops) if ops else []


def apply(p) -> None:
    p.set_in_module("megatron.core.pipeline_parallel.p2p_communication", "_batched_p2p_ops",
                    _tagged_batched_p2p_ops)
    import torch.distributed as dist

    p.set(dist, "all_gather", _gloo_tolerant_all_gather(dist.all_gather))
    p.set(torch.Tensor, "type", _type_as_cuda(torch.Tensor.type))
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    p.set(WrappedTorchNorm, "__new__", _sequence_parallel_torch_norm(WrappedTorchNorm.__new__))
    p.set_in_module("megatron.core.tensor_parallel.random", "_get_cuda_rng_state", _get_rng_state)
    p.set_in_module("megatron.core.tensor_parallel.random", "_set_cuda_rng_state", _set_rng_state)
    # 0.16.1 reads a module global that is never defined without Transformer Engine.
    p.set_in_module("megatron.core.transformer.moe.moe_utils", "te_general_gemm", None,
                    only_if_missing=True)
    for module in ("megatron.core.models.common.embeddings.rope_utils",
                   "megatron.core.models.common.embeddings.rotary_pos_embedding",
                   "megatron.core.models.common.embeddings.yarn_rotary_pos_embedding"):
        p.set_in_module(module, "get_pos_emb_on_this_cp_rank", _pos_emb_on_this_cp_rank)
    for module in ("megatron.core.transformer.moe.moe_utils",
                   "megatron.core.transformer.moe.token_dispatcher"):
        p.set_in_module(module, "maybe_move_tensor_to_cpu", _maybe_move_tensor_to_cpu)
