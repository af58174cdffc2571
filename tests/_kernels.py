"""Counting calls into ferroptim's Rust step kernels.

Parity with torch proves nothing about *where* a step ran if ferroptim quietly
handed it to torch; :func:`kernel_calls` wraps the ``_core.*_step`` functions (the
optimizer modules look them up on ``_core`` at call time) and counts calls.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ferroptim import _core
from optim_db import FAMILIES

#: Every Rust step entry point the registry names.
KERNELS = tuple(dict.fromkeys(family.kernel for family in FAMILIES.values()))


@contextlib.contextmanager
def kernel_calls() -> Iterator[Counter[str]]:
    """Counts calls of each Rust step kernel while the block runs."""
    counts: Counter[str] = Counter()
    originals = {name: getattr(_core, name) for name in KERNELS}

    def wrap(name: str, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(_core, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(_core, name, fn)
