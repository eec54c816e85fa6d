"""The folded token dispatcher: deduplicated, placement-aware, on Megatron's interface.

``send_plan`` holds the pure routing arithmetic (replica choice, send plans), ``token_dispatcher``
the communication, ``moe_layer`` the MoELayer subclass and layer-spec swap, ``counters`` what
a dispatch moves.
"""
