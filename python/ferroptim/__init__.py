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
from ferroptim.adagrad import Adagrad
from ferroptim.adam import Adam, AdamW
from ferroptim.clip import clip_grad_norm_, clip_grad_value_, get_total_norm
from ferroptim.rmsprop import RMSprop
from ferroptim.sgd import SGD

__version__: str = _core.__version__

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "RMSprop",
    "__version__",
    "clip_grad_norm_",
    "clip_grad_value_",
    "get_backend",
    "get_num_threads",
    "get_total_norm",
    "set_backend",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
]
