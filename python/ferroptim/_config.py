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

    Defaults to ``FERROPTIM_NUM_THREADS`` if set, else the machine's cores (as
    the OS reports them to this process). Independent of
    ``torch.get_num_threads()``. A forked child process (a DataLoader worker,
    say) steps on one thread until it calls :func:`set_num_threads`.
    """
    return _core.get_num_threads()


def max_num_threads() -> int:
    """The most threads :func:`set_num_threads` (and ``FERROPTIM_NUM_THREADS``) accept:
    4 per core available to this process, and at least 256.

    Every configured thread is a real OS thread of ferroptim's pool; the cap stops
    a typo (``set_num_threads(10**6)``) from spawning threads until the machine stalls.
    """
    return _core.max_num_threads()


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads ferroptim steps CPU tensors with.

    Results are bitwise identical for any thread count. Raises ``ValueError``
    for fewer than 1 or more than :func:`max_num_threads` (and ``TypeError`` for
    anything but an ``int``); the setting is then left as it was.
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int, got {type(num_threads).__name__}")
    if num_threads < 1:
        raise ValueError(f"the number of threads must be at least 1, got {num_threads}")
    limit = max_num_threads()
    if num_threads > limit:
        # Checked here too: an int beyond 64 bits never reaches Rust's check.
        raise ValueError(
            f"the number of threads must be at most {limit} (4 per available core, "
            f"at least 256), got {num_threads}"
        )
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
