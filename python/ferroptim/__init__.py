"""ferroptim: fast, exact, drop-in optimizers for PyTorch.

Replace ``torch.optim.AdamW(...)`` with ``ferroptim.AdamW(...)``: same
arguments, same numbers, CPU steps in Rust (SIMD kernels, parallel over our own
thread pool), tensors on other devices through torch's own kernels.
"""

from ferroptim import _core
from ferroptim._config import (
    get_backend,
    get_num_threads,
    set_backend,
    set_num_threads,
    set_simd_level,
    simd_level,
    supported_simd_levels,
)
from ferroptim.adam import Adam, AdamW

__version__: str = _core.__version__

__all__ = [
    "Adam",
    "AdamW",
    "__version__",
    "get_backend",
    "get_num_threads",
    "set_backend",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
]
