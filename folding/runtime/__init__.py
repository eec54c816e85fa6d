"""Running Megatron-Core where it was not written to run: the CPU runtime."""
