"""Context parallelism without Transformer Engine.

Megatron runs context-parallel attention only inside Transformer Engine; its own
``DotProductAttention`` refuses CP > 1. This package gives Megatron's layer spec a core attention
that splits the sequence over the CP group with Megatron's own layout and exchanges keys and
values by the ``cp_comm_type`` Megatron names:

- ``layout``: which token positions a CP rank holds, and the sequence-length rules (pure);
- ``kernel``: attention over one block of queries and keys, with its log-sum-exp, and its
  backward pass (pure torch, fp32 accumulation);
- ``exchange``: the collectives of the three modes, each counting the bytes it sends;
- ``attention``: the autograd functions of p2p, all_gather and a2a, and the Megatron module.
"""
