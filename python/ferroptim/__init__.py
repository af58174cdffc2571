"""ferroptim: fast, exact, drop-in optimizers for PyTorch.

Replace ``torch.optim.AdamW(...)`` with ``ferroptim.AdamW(...)``: same
arguments, same numbers, CPU steps in Rust (SIMD kernels, parallel over our own
thread pool), tensors on other devices through torch's own kernels.

Without PyTorch installed, ``ferroptim.functional`` still steps NumPy arrays.
"""

import importlib
from typing import Any

from ferroptim import _core, functional
from ferroptim._config import (
    get_backend,
    get_num_threads,
    max_num_threads,
    set_backend,
    set_num_threads,
    set_simd_level,
    simd_level,
    supported_simd_levels,
)

__version__: str = _core.__version__

_NEEDS_TORCH = (
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "LAMB",
    "LARS",
    "LBFGS",
    "Lamb",
    "Lion",
    "Muon",
    "NAdam",
    "RAdam",
    "RMSprop",
    "SparseAdam",
    "Rprop",
    "ASGD",
    "AdEMAMix",
    "Adan",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "clip_grad_norm_",
    "clip_grad_value_",
    "get_total_norm",
)

try:
    import torch
except ImportError:  # numpy-only install: the functional API works, the rest explains
    _torch_missing = True
else:
    _torch_missing = False
    from ferroptim.adadelta import Adadelta
    from ferroptim.adafactor import Adafactor
    from ferroptim.adagrad import Adagrad
    from ferroptim.adam import Adam, AdamW
    from ferroptim.adamax import Adamax
    from ferroptim.adan import Adan
    from ferroptim.ademamix import AdEMAMix
    from ferroptim.asgd import ASGD
    from ferroptim.clip import clip_grad_norm_, clip_grad_value_, get_total_norm
    from ferroptim.lamb import LAMB, Lamb
    from ferroptim.lars import LARS
    from ferroptim.lbfgs import LBFGS
    from ferroptim.lion import Lion
    from ferroptim.nadam import NAdam
    from ferroptim.radam import RAdam
    from ferroptim.rmsprop import RMSprop
    from ferroptim.rprop import Rprop
    from ferroptim.schedulefree import ScheduleFreeAdamW, ScheduleFreeSGD
    from ferroptim.sgd import SGD
    from ferroptim.sparse_adam import SparseAdam

    if hasattr(torch.optim, "Muon"):  # (ferroptim.Muon subclasses torch's: torch >= 2.9)
        from ferroptim.muon import Muon


def __getattr__(name: str) -> Any:
    if name == "tune":
        # Imported on first use, so `import ferroptim` costs nothing for users who never tune.
        return importlib.import_module("ferroptim.tune")
    if name == "Muon" and not _torch_missing:
        raise ImportError(
            "ferroptim.Muon subclasses torch.optim.Muon, which this torch lacks "
            "(it came in torch 2.9)"
        )
    if name in _NEEDS_TORCH and _torch_missing:
        raise ImportError(
            f"ferroptim.{name} needs PyTorch: pip install 'ferroptim[torch]' "
            "(ferroptim.functional works without it)"
        )
    raise AttributeError(f"module 'ferroptim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "tune"])  # `tune` is imported on first use


__all__ = [
    "ASGD",
    "LAMB",
    "LARS",
    "LBFGS",
    "SGD",
    "AdEMAMix",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Adan",
    "Lamb",
    "Lion",
    "Muon",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "SparseAdam",
    "__version__",
    "clip_grad_norm_",
    "clip_grad_value_",
    "functional",
    "get_backend",
    "get_num_threads",
    "get_total_norm",
    "max_num_threads",
    "set_backend",
    "set_num_threads",
    "set_simd_level",
    "simd_level",
    "supported_simd_levels",
]
