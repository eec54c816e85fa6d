"""folding: MoE Parallel Folding for Megatron-Core.

Attention layers use TP x CP x DP x PP and MoE layers use ETP x EP x EDP x PP on the same GPUs.
This package builds and checks both meshes, moves tokens between them, places experts, models
the cost of a layout, and verifies every layout on CPU against a single-process reference.
"""

from folding.errors import FoldingError, InvalidFolding
from folding.mesh import FoldingSpec

__version__ = "0.1.0"
__all__ = ["FoldingError", "FoldingSpec", "InvalidFolding", "__version__"]
