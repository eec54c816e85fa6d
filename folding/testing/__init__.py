"""Helpers for tests and benchmarks, not for training: a single MoE layer harness for the
dispatcher and the memory-measurement cases run on real folded models."""
