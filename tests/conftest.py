import os
import sys
import warnings

# Megatron warns on import when neither Apex nor Transformer Engine is installed: expected here.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(__file__))
