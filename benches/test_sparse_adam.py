"""One ``step()`` of ferroptim.SparseAdam vs torch.optim.SparseAdam on an embedding's sparse
gradient (1M x 64, 4096 looked-up rows). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["sparse_adam"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_sparse_adam_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
