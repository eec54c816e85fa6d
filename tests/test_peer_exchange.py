"""The relay's point-to-point exchange against torch's all-to-all, on gloo ranks."""

import pytest
import torch

from folding.run.launch import run_ranks

pytestmark = pytest.mark.multiprocess

# Rows each rank sends to each rank (zeros included: those pairs post nothing).
SPLITS = [[2, 0, 3, 0], [0, 1, 0, 0], [4, 0, 0, 2], [0, 0, 1, 5]]


def _exchange(rank, world, wrong_own):
    import torch.distributed as dist

    from folding.dispatcher.peer_exchange import peer_all_to_all

    g = torch.Generator().manual_seed(rank)
    input_splits = SPLITS[rank]
    output_splits = [SPLITS[source][rank] for source in range(world)]
    rows = torch.randn(sum(input_splits), 3, generator=g, requires_grad=True)
    expected = torch.empty(sum(output_splits), 3)
    dist.all_to_all_single(expected, rows.detach(), output_splits, input_splits)
    own = (rank + 1) % world if wrong_own else rank
    [out] = peer_all_to_all([rows], output_splits, input_splits, list(range(world)), own)
    weights = torch.randn(out.shape, generator=g)
    (out * weights).sum().backward()
    # The gradient of a sent row is the weight its receiver applied to it.
    expected_grad = torch.empty(rows.shape)
    dist.all_to_all_single(expected_grad, weights, input_splits, output_splits)
    return torch.equal(out.detach(), expected), torch.equal(rows.grad, expected_grad)


def _exchange_two(rank, world):
    """16-bit rows and their fp32 weights through one exchange, as a relayed dispatch sends them."""
    import torch.distributed as dist

    from folding.dispatcher.peer_exchange import peer_all_to_all
    from folding.testing.dispatcher_harness import counting_peer_exchanges

    g = torch.Generator().manual_seed(rank)
    input_splits = SPLITS[rank]
    output_splits = [SPLITS[source][rank] for source in range(world)]
    rows = torch.randn(sum(input_splits), 3, generator=g).bfloat16().requires_grad_(True)
    weights = torch.randn(sum(input_splits), 2, generator=g, requires_grad=True)
    with counting_peer_exchanges() as batches:
        out_rows, out_weights = peer_all_to_all([rows, weights], output_splits, input_splits,
                                                list(range(world)), rank)
        upstream = [torch.randn(out_rows.shape, generator=g).bfloat16(),
                    torch.randn(out_weights.shape, generator=g)]
        ((out_rows * upstream[0]).sum() + (out_weights * upstream[1]).sum()).backward()
    equal = []
    for sent, got, up in zip((rows, weights), (out_rows, out_weights), upstream):
        expected = sent.new_empty(got.shape)
        dist.all_to_all_single(expected, sent.detach(), output_splits, input_splits)
        expected_grad = sent.new_empty(sent.shape)
        dist.all_to_all_single(expected_grad, up, input_splits, output_splits)
        equal += [torch.equal(got.detach(), expected), torch.equal(sent.grad, expected_grad),
                  got.dtype == sent.dtype]
    # Forward and backward: one batch each, whenever this rank has a peer to talk to.
    peers = sum(1 for i in range(world) if i != rank and (input_splits[i] or output_splits[i]))
    return all(equal), len(batches), (2 if peers else 0)


def test_peer_exchange_equals_all_to_all_forward_and_backward():
    assert run_ranks(_exchange, 4, False, timeout_s=120) == [(True, True)] * 4


def test_a_peer_exchange_with_the_wrong_own_index_is_caught():
    """The check can fail: a rank that copies the wrong rows locally receives wrong data (or the
    ranks disagree about who sends what, which the launcher reports instead of hanging)."""
    from folding.run.launch import RankFailed

    try:
        results = run_ranks(_exchange, 4, True, timeout_s=60, collective_timeout_s=20)
    except RankFailed:
        return
    assert results != [(True, True)] * 4


def test_tensors_of_two_dtypes_share_one_exchange_each_way():
    for equal, batches, expected in run_ranks(_exchange_two, 4, timeout_s=120):
        assert equal and batches == expected
