"""Everything that touches Megatron-Core: the one FoldingSpec <-> Megatron mapping, process
groups, the GPT model and its optimizer, the plugin Megatron-LM's training script calls, its
pretrain flags, router hooks, and the CPU runtime that lets Megatron run with gloo."""
