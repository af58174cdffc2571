"""Process-wide settings: thread count, SIMD level, and the backend choice."""

from __future__ import annotations

import os

from ferroptim import _core

#: Environment variable: ``torch`` sends every step through torch's own
#: implementations (fused / foreach / for-loop), even for CPU tensors.
BACKEND_ENV_VAR = "FERROPTIM_BACKEND"
_BACKENDS = ("auto", "torch")


def _backend_from_env() -> str:
    value = os.environ.get(BACKEND_ENV_VAR, "").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV_VAR}={value!r}: expected one of {', '.join(_BACKENDS)}")
    return value


_backend = _backend_from_env()

_env_errors = _core.environment_errors()
if _env_errors:
    raise ValueError("ferroptim: " + "; ".join(_env_errors))


def get_num_threads() -> int:
    """Number of threads ferroptim steps CPU tensors with.

    Defaults to ``FERROPTIM_NUM_THREADS`` if set, else the machine's cores.
    Independent of ``torch.get_num_threads()``. A forked child process (a
    DataLoader worker, say) steps on one thread until it calls
    :func:`set_num_threads`.
    """
    return _core.get_num_threads()


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads ferroptim steps CPU tensors with.

    Results are bitwise identical for any thread count.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    _core.set_num_threads(num_threads)


def simd_level() -> str:
    """The instruction set the kernels run with: ``avx512``, ``avx2``, ``neon`` or ``scalar``."""
    return _core.simd_level()


def supported_simd_levels() -> list[str]:
    """The instruction sets this CPU can run, best first."""
    return list(_core.supported_simd_levels())


def set_simd_level(level: str | None) -> str:
    """Forces an instruction set (``None``: back to ``FERROPTIM_SIMD`` or the best one).

    Every level gives bitwise-identical results; forcing one is for testing and
    benchmarking. Returns the level now in use. Raises ``ValueError`` for a level
    this CPU cannot run.
    """
    return _core.set_simd_level(level)


def get_backend() -> str:
    """``auto`` (CPU float tensors step in Rust) or ``torch`` (everything steps in torch)."""
    return _backend


def set_backend(backend: str) -> None:
    """Chooses where steps run: ``auto`` (default) or ``torch``.

    ``torch`` routes every tensor through torch's own implementation, exactly as
    tensors on a GPU are routed; it is how the GPU path is tested on machines
    without one. Also settable with the ``FERROPTIM_BACKEND`` environment variable.
    """
    global _backend
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(_BACKENDS)}, got {backend!r}")
    _backend = backend
