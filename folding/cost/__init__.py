"""Cost models: what a folding costs before it is launched.

One module per concern, all pure computation:

- ``flops``: FLOPs per iteration, Megatron's convention and other labelled conventions.
- ``memory``: bytes per rank: parameters, gradients, optimizer states, activations, dispatcher
  buffers.
- ``hardware``: GPU profiles (peak rates, bandwidths) with their public sources.
- ``comm``: alpha-beta times of the collectives and how far each group reaches across nodes.
- ``step_time``: predicted iteration time (roofline compute, communication, pipeline schedule).
- ``calibration``: the step-time model's global parameters (the stored fit), ``published``: the
  published measurements they are fitted to, ``fit``: the least-squares fit and leave-one-out.
- ``predict``: one folding's step time, throughput and memory (``folding predict``).
- ``planner``: enumerate legal foldings, drop those that do not fit, rank by predicted step time.
- ``mfu_log``: read Megatron training logs and recompute throughput and MFU.

The parameter tensors each rank holds come from ``folding.layout.parameters``; the recipe as
pretrain_gpt.py flags from ``folding.megatron.flags``.
"""
