"""hetero: DeepSeek-class MoE models on one GPU plus CPU RAM."""

import os

# The device budget is planned to the last few hundred MiB: let torch's allocator grow segments
# in place rather than strand free memory between fixed-size blocks (read when CUDA first
# allocates; a value the user set is kept).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

__version__ = "0.1.0"
