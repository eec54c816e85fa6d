"""Hooks into Megatron's router module that the checker and the trace recorder share.

Megatron's routing helpers are module-level functions that do not know which layer calls them.
``RouterPatch`` wraps ``TopKRouter.routing`` to note the calling router's layer number, and
replaces one helper of ``megatron.core.transformer.moe.router`` with a wrapper that can read it;
``remove`` restores both.
"""

from __future__ import annotations

import threading
from typing import Callable


class RouterPatch:
    """Replace ``router.<name>`` by ``make_wrapper(original, current_layer)`` while installed."""

    def __init__(self, name: str, make_wrapper: Callable):
        from megatron.core.transformer.moe import router

        self._router = router
        self._name = name
        self._layer = threading.local()
        self._original_routing = router.TopKRouter.routing
        self._original = getattr(router, name)
        layer = self._layer
        original_routing = self._original_routing

        def routing(self_router, logits, *args, **kwargs):
            layer.number = self_router.layer_number
            return original_routing(self_router, logits, *args, **kwargs)

        router.TopKRouter.routing = routing
        setattr(router, name, make_wrapper(self._original, self.current_layer))

    def current_layer(self) -> int:
        """Layer number (Megatron's, 1-based) of the router that is running."""
        return self._layer.number

    def remove(self) -> None:
        self._router.TopKRouter.routing = self._original_routing
        setattr(self._router, self._name, self._original)
