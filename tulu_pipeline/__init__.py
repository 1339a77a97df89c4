"""tulu-pipeline: a Tülu-3-style post-training factory with row-level provenance.

The library is importable and testable without Dagster; `assets/` and `resources/` wrap it.
"""

import os

__version__ = "0.1.0"

# No model hub at run time: weights, data and code come from the checkout or the object store. transformers
# (5.2x) loads Hub kernels by default whenever the `kernels` package is installed, and on CUDA the first train() or
# eval() then fetches them and fails offline (seen on the GPU machine: benchmarks/results/gpu.json). A deployment
# that mirrors the kernels can set USE_HUB_KERNELS=1.
os.environ.setdefault("USE_HUB_KERNELS", "0")
