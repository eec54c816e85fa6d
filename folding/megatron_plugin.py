"""The name Megatron-LM's patched ``pretrain_gpt.py`` imports (see ``patches/``); the plugin
itself lives in ``folding.megatron.plugin``."""

from folding.megatron.plugin import (add_arguments, check_mesh, check_mesh_hook,  # noqa: F401
                                     folded_decoder_spec, layer_spec_provider, spec_from_args)
