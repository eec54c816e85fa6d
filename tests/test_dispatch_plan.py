"""Pure routing arithmetic of the folded dispatcher: replica choice, deduplication, expansion."""

import math

import torch

from folding.dispatcher.send_plan import (SlotMap, _greedy_least_loaded_each, choose_slots,
                                          count_sends, expand_received, plan_rows)

# Ranks 0,1 on node 0 and ranks 2,3 on node 1; 3 slots per rank.
SLOTS = SlotMap(torch.tensor([2, 1, 1, 3, 6, 2, 0, 5, 3, 4, 7, 4]), 3, torch.tensor([0, 0, 1, 1]))


def choose_replicas(routing_map, slots, own_rank):
    """[T, E]: the slot serving each routed pair, -1 elsewhere (a test-side view of the choice)."""
    slot_routed = choose_slots(routing_map, slots, own_rank)
    chosen = torch.full(routing_map.shape, -1, dtype=torch.long)
    token, slot = torch.nonzero(slot_routed, as_tuple=True)
    chosen[token, slots.slot_expert[slot]] = slot
    assert slot_routed.sum() == routing_map.sum(), "one slot per routed pair"
    return slot_routed, chosen


def plan(slot_routed, per_rank, ranks):
    sends = count_sends(slot_routed, per_rank, ranks)
    return sends, plan_rows(sends, slot_routed, int(sends.counts[:, 0].sum()))


def routing(rows):
    m = torch.zeros(len(rows), 8, dtype=torch.bool)
    for t, experts in enumerate(rows):
        m[t, experts] = True
    return m


def test_replica_rule_by_hand():
    _, chosen = choose_replicas(routing([[1, 2], [3, 5], [2, 4], [4], [0, 7], [3, 4]]), SLOTS, own_rank=2)
    # token 0: expert 1 has slots 1, 2 (rank 0): least loaded, lowest slot -> 1; expert 2 then
    #          prefers slot 0 on rank 0, where the token already goes.
    assert chosen[0, 1] == 1 and chosen[0, 2] == 0
    # token 1: expert 5 sits on rank 2 only, so expert 3 takes its replica there (slot 8).
    assert chosen[1, 5] == 7 and chosen[1, 3] == 8
    # token 2: expert 2 by load (slot 0 already serves token 0) -> slot 5; expert 4 on own node.
    assert chosen[2, 2] == 5 and chosen[2, 4] == 9
    # token 5: expert 3 has a replica on the token's own rank (2): slot 8.
    assert chosen[5, 3] == 8
    assert (chosen[routing([[1, 2], [3, 5], [2, 4], [4], [0, 7], [3, 4]]) == False] == -1).all()  # noqa: E712


def test_every_routed_pair_gets_a_slot_of_its_expert():
    g = torch.Generator().manual_seed(0)
    m = torch.zeros(200, 8, dtype=torch.bool)
    m.scatter_(1, torch.multinomial(torch.ones(200, 8), 3, generator=g), True)
    for own in range(4):
        _, chosen = choose_replicas(m, SLOTS, own)
        assert ((chosen >= 0) == m).all()
        assert (SLOTS.slot_expert[chosen[m]] == torch.nonzero(m)[:, 1]).all()


def _replica_rule_one_pair_at_a_time(m, slots, own):
    """The replica rule written as a plain loop over experts and tokens: the reference."""
    expert_slots = {e: [s for s in range(slots.slot_expert.numel()) if slots.slot_expert[s] == e]
                    for e in range(m.shape[1])}
    rank = lambda s: s // slots.slots_per_rank  # noqa: E731
    node = slots.rank_node.tolist()
    chosen = [[-1] * m.shape[1] for _ in range(m.shape[0])]
    for t in range(m.shape[0]):
        for e in range(m.shape[1]):
            if m[t, e] and len(expert_slots[e]) == 1:
                chosen[t][e] = expert_slots[e][0]
    for e, where in expert_slots.items():
        if len(where) < 2:
            continue
        load = {s: 0 for s in where}
        waiting = []
        for t in range(m.shape[0]):
            if not m[t, e]:
                continue
            sent = {rank(chosen[t][f]) for f in range(m.shape[1])
                    if chosen[t][f] >= 0 and len(expert_slots[f]) == 1}
            for rule in (lambda s: rank(s) in sent, lambda s: rank(s) == own,
                         lambda s: node[rank(s)] == node[own]):
                hits = [s for s in where if rule(s)]
                if hits:
                    chosen[t][e] = hits[0]
                    load[hits[0]] += 1
                    break
            else:
                waiting.append(t)
        for t in waiting:  # least loaded after the rules above, tokens in order
            best = min(where, key=lambda s: (load[s], s))
            chosen[t][e] = best
            load[best] += 1
    return torch.tensor(chosen)


def test_replica_rule_equals_the_rule_applied_one_pair_at_a_time():
    g = torch.Generator().manual_seed(5)
    # Expert 0 on node 0 only (two ranks); experts 1, 2, 3 on both nodes: every rule is needed.
    slots = SlotMap(torch.tensor([0, 1, 2, 0, 3, 4, 5, 6, 7, 1, 2, 3]), 3, torch.tensor([0, 0, 1, 1]))
    for own in range(4):
        m = torch.zeros(300, 8, dtype=torch.bool)
        m.scatter_(1, torch.multinomial(torch.ones(300, 8), 3, generator=g), True)
        _, chosen = choose_replicas(m, slots, own)
        assert torch.equal(chosen, _replica_rule_one_pair_at_a_time(m, slots, own))


def test_greedy_least_loaded_matches_one_at_a_time():
    for loads, count in [([0, 0, 0], 7), ([5, 1, 3], 9), ([2, 2], 1), ([0, 4, 4, 1], 12)]:
        load = list(loads)
        expected = []
        for _ in range(count):
            best = min(range(len(load)), key=lambda i: (load[i], i))
            expected.append(best)
            load[best] += 1
        assert _greedy_least_loaded_each(torch.tensor([loads]), count)[0].tolist() == expected


def test_deduplicated_plan_sends_each_token_once_per_rank():
    identity = SlotMap(torch.arange(8), 2, torch.tensor([0, 0, 1, 1]))
    m = routing([[0, 1], [0, 2], [5, 7], [6, 7]])
    slot_routed, _ = choose_replicas(m, identity, own_rank=0)
    sends, rows = plan(slot_routed, 2, 4)
    # token 0 -> rank 0 once (experts 0 and 1 both there); token 1 -> ranks 0, 1;
    # token 2 -> ranks 2, 3; token 3 -> rank 3 once.
    assert sends.counts[:, 0].tolist() == [2, 1, 1, 2]
    # Pairs per destination local slot travel with the row counts.
    assert sends.counts[:, 1:].tolist() == [[2, 1], [1, 0], [0, 1], [1, 2]]
    assert rows.row_token.tolist() == [0, 1, 1, 2, 2, 3]
    # Rows are grouped by destination; each row marks its routed local slots.
    assert rows.row_mask.tolist() == [[True, True], [True, False], [True, False], [False, True],
                                      [False, True], [True, True]]
    # Each row's block of slots is its destination's: token * ranks + rank.
    assert rows.row_block.tolist() == [0, 4 + 0, 4 + 1, 8 + 2, 8 + 3, 12 + 3]


def test_uniform_dedup_ratio_matches_the_closed_form():
    """Rows to other ranks over Megatron's copies to other ranks: P(1 - C(E-E/P,k)/C(E,k))/k."""
    E, P, k, T = 64, 8, 8, 20000
    g = torch.Generator().manual_seed(3)
    m = torch.zeros(T, E, dtype=torch.bool)
    m.scatter_(1, torch.multinomial(torch.ones(T, E), k, generator=g), True)
    slots = SlotMap(torch.arange(E), E // P, torch.zeros(P, dtype=torch.long))
    sends = count_sends(choose_slots(m, slots, 0), E // P, P)
    copies = int(m[:, E // P:].sum())  # Megatron: one copy per expert not on rank 0
    rows = int(sends.counts[1:, 0].sum())
    expected = P * (1 - math.comb(E - E // P, k) / math.comb(E, k)) / k
    assert abs(rows / copies - expected) / expected < 0.01


def test_expand_received_sorts_pairs_by_local_slot():
    mask = torch.tensor([[True, False, True], [False, False, True], [True, True, False]])
    rows, local = expand_received(mask, 5)
    assert list(zip(rows.tolist(), local.tolist())) == [(0, 0), (2, 0), (2, 1), (0, 2), (1, 2)]


def test_traffic_counters_total_dispatches_until_reset():
    from folding.dispatcher.counters import TrafficCounters

    # Own rank 2 on node 1: tokens 1, 4, 5 reach rank 2 (self), 3 on node 1, 0-1 on node 0.
    m = routing([[1, 2], [3, 5], [2, 4], [4], [0, 7], [3, 4]])
    sends = count_sends(choose_slots(m, SLOTS, own_rank=2), 3, 4)
    probs = m.float() / 2
    probs[3, 4] = 0.0  # a pair dropped by capacity keeps its routing bit, not its weight
    counters = TrafficCounters()
    hidden = torch.zeros(6, 16)  # 64 bytes a row
    for _ in range(2):
        counters.record_rows(sends.counts[:, 0], hidden, 2, SLOTS.rank_node)
        counters.record_pairs(m, probs, 2)
        counters.record_received(5)
    s = counters.summary()
    counts = sends.counts[:, 0]
    assert s["dispatches"] == 2
    assert s["tokens_self"] == 2 * int(counts[2]) and s["tokens_node"] == 2 * int(counts[3])
    assert s["tokens_remote"] == 2 * int(counts[0] + counts[1])
    assert s["bytes_remote"] == s["tokens_remote"] * 64
    assert s["pairs_routed"] == 2 * 10 and s["pairs_dropped"] == 2 * (12 - 10)
    assert s["received"] == 10
    counters.reset()
    assert set(counters.summary().values()) == {0}


def test_a_placement_of_the_wrong_size_is_a_folding_error_naming_the_sizes():
    from types import SimpleNamespace

    import pytest

    from folding.dispatcher.token_dispatcher import FoldedTokenDispatcher
    from folding.errors import FoldingError

    dispatcher = SimpleNamespace(ep_size=4, slots_per_rank=2, rank_node=torch.zeros(4))
    with pytest.raises(FoldingError, match=r"placement has 6 slots, EP=4 x 2 slots per rank = 8"):
        FoldedTokenDispatcher.set_slot_experts(dispatcher, torch.arange(6))
    FoldedTokenDispatcher.set_slot_experts(dispatcher, torch.arange(8))
    assert dispatcher.slot_map is not None


def test_node_layout_gateways_and_refusals():
    from folding.dispatcher.send_plan import NodeLayout

    layout = NodeLayout(torch.tensor([0, 0, 0, 1, 1, 1]), own_rank=4)
    assert layout.active and layout.gateways.tolist() == [1, 4] and layout.own_node == 1
    assert NodeLayout(torch.tensor([0, 1, 0, 1]), 0).reason == (
        "the EP ranks of a node are not contiguous in the EP group")
    assert "different numbers" in NodeLayout(torch.tensor([0, 0, 0, 1]), 0).reason
    assert NodeLayout(torch.tensor([0, 0]), 0).reason == "all EP ranks are on one node"


def test_relayed_rows_cross_each_remote_node_once_and_reach_the_same_ranks():
    """The relay's counts and rows against the direct plan: a token goes once to a remote node
    hosting any of its experts, directly to the ranks of its own node that host one, and the
    rank that forwards it sends exactly the rows the direct plan would have sent."""
    from folding.dispatcher.send_plan import (NodeLayout, plan_forward, plan_relay_rows,
                                              relay_counts, relay_sends)

    g = torch.Generator().manual_seed(2)
    experts, ranks, per_node, tokens = 16, 4, 2, 64
    identity = SlotMap(torch.arange(experts), experts // ranks, torch.tensor([0, 0, 1, 1]))
    m = torch.zeros(tokens, experts, dtype=torch.bool)
    m.scatter_(1, torch.multinomial(torch.ones(tokens, experts), 4, generator=g), True)
    slot_routed = choose_slots(m, identity, 0)
    by_rank = count_sends(slot_routed, 4, ranks)
    expected_nodes = m.view(tokens, 2, 8).any(dim=2).sum(dim=0)
    layout = NodeLayout(identity.rank_node, own_rank=1)
    hop = relay_sends(by_rank.sent, layout)
    # Rank 1 sends directly to ranks 0 and 1 (its node) and once per token to gateway 3.
    assert hop[:, :2].tolist() == by_rank.sent[:, :2].tolist()
    assert hop[:, 2].sum() == 0 and hop[:, 3].sum() == expected_nodes[1]
    # Rows reach rank 1 from its own node directly, from rank 2 through rank 0 (its rail).
    assert layout.source_gateway.tolist() == [1, 1, 0, 1]
    assert NodeLayout(identity.rank_node, own_rank=2).source_gateway.tolist() == [2, 3, 2, 2]
    message = relay_counts(by_rank.counts, hop.sum(dim=0), layout)
    # Every rank hears what will reach it from rank 1; ranks 0 and 1 forward their own rows to
    # themselves, gateway 3 the rows of its node: the direct plan's.
    assert message[:, 1:6].tolist() == by_rank.counts.tolist()
    assert message[:, 0].tolist() == hop.sum(dim=0).tolist()
    forward = message[:, 6:].view(ranks, per_node, 5)
    assert forward[0].tolist() == [by_rank.counts[0].tolist(), [0] * 5]
    assert forward[1].tolist() == [[0] * 5, by_rank.counts[1].tolist()]
    assert forward[2].abs().sum() == 0
    assert forward[3].tolist() == by_rank.counts[2:].tolist()
    rows = plan_relay_rows(hop, slot_routed, layout, int(hop.sum()))
    # A direct row carries only its destination's slots; a row to another node all of them.
    direct, remote = rows.row_block % 2 == 0, rows.row_block % 2 == 1  # blocks are nodes
    assert torch.equal(rows.row_mask[direct].sum(), slot_routed[:, :8].sum())
    node1 = rows.row_mask[remote]
    assert torch.equal(node1.sum(), slot_routed[:, 8:].sum())
    source, member = plan_forward(node1, per_node, int(by_rank.counts[2:, 0].sum()))
    assert torch.bincount(member, minlength=2).tolist() == by_rank.counts[2:, 0].tolist()
    assert source.numel() == len(set(zip(source.tolist(), member.tolist())))
    # At rank 0, rank 1's direct rows name rank 0 alone: forwarded to itself.
    to_rank0 = rows.row_mask[:int(by_rank.counts[0, 0])]
    _, member = plan_forward(to_rank0, per_node, int(by_rank.counts[0, 0]))
    assert member.tolist() == [0] * int(by_rank.counts[0, 0])


def test_bench_model_rows_deliver_every_pair_once_and_cross_once_per_node():
    """tools/bench_dispatch.py's rows at scale, from the plans alone: Megatron sends a row per
    (token, expert); rank-level deduplication one per (token, rank); the relay's first hop one
    per (token, remote node) across nodes, and its second hop delivers exactly the rank-level
    rows, each from a rank of the destination's node."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / "bench_dispatch.py"
    spec = importlib.util.spec_from_file_location("bench_dispatch", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    ep, experts, topk, per_node, tokens = 8, 32, 4, 2, 200
    hops = bench.rows_per_hop_at_scale(ep, experts, topk, per_node, tokens, seed=3)
    # Regenerate the same routing to count by hand.
    g = torch.Generator().manual_seed(3)
    node = torch.arange(ep) // per_node
    for source in range(ep):
        ids = bench.routing_ids("uniform", tokens, topk, g, experts)
        ranks = ids // (experts // ep)
        assert hops["megatron"][source][0] == torch.bincount(ranks.view(-1), minlength=ep).tolist()
        distinct = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, ranks, True)
        assert hops["rank"][source][0] == distinct.sum(dim=0).tolist()
        remote = distinct.view(tokens, ep // per_node, per_node).any(dim=2).sum(dim=0)
        first_hop = torch.tensor(hops["node"][source][0])
        crossing = node != node[source]
        assert int(first_hop[crossing].sum()) == int(remote[torch.arange(ep // per_node)
                                                            != node[source]].sum())
    second = torch.tensor([hops["node"][r][1] for r in range(ep)])
    delivered = torch.tensor([hops["rank"][r][0] for r in range(ep)]).sum(dim=0)
    assert second.sum(dim=0).tolist() == delivered.tolist()
    assert all(second[r, node != node[r]].sum() == 0 for r in range(ep))


def test_relayed_rows_are_put_back_in_source_order():
    """Rank 1 of two nodes of 2: rows arrive through rank 0 (from rank 2, its rail) and through
    itself (from ranks 0, 1 and 3), for each of two ETP peers; the order sorts them by (peer,
    source), each source's rows in arrival order."""
    from folding.dispatcher.send_plan import NodeLayout, order_by_source

    layout = NodeLayout(torch.tensor([0, 0, 1, 1]), own_rank=1)
    assert layout.arrival_order.tolist() == [2, 0, 1, 3]
    rows = torch.tensor([[1, 2, 3, 1], [0, 1, 1, 2]])  # [peer, source]
    # Arrival: peer 0: source 2 (3 rows), 0 (1), 1 (2), 3 (1); peer 1: 2 (1), 1 (1), 3 (2).
    arrived_source = [2, 2, 2, 0, 1, 1, 3, 12, 11, 13, 13]
    order = order_by_source(rows, layout.arrival_order, 11)
    assert [arrived_source[i] for i in order.tolist()] == sorted(arrived_source)
    assert order.tolist()[:4] == [3, 4, 5, 0]  # source 0, then 1's two rows in order, then 2
