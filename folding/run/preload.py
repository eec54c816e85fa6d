"""What the ranks' fork server imports once, so that every CPU rank starts as a fork of it.

Importing torch and Megatron-Core costs each rank several CPU seconds, paid by every rank of
every launch when ranks are spawned: most of a short run's wall time on a few cores. The fork
server (``folding.run.launch``) imports this module once per launching process, then forks each
rank from that fresh, single-threaded interpreter. An import that fails here costs only the
saving: the rank imports what it needs itself.
"""

from folding.run.launch import quiet_imports

quiet_imports()
try:
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401

    import folding.megatron.cpu_runtime  # noqa: F401
    import folding.run.rank_trainer  # noqa: F401
except Exception:  # noqa: BLE001 - a rank imports for itself what is missing
    pass
