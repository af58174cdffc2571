"""One ``step()`` of ferroptim.Adagrad vs torch.optim.Adagrad: fused, foreach,
for-loop, default. Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adagrad"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adagrad_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
