"""One ``step()`` of ferroptim.Adafactor vs torch.optim.Adafactor (defaults): foreach,
for-loop, default (the for-loop; torch has no fused Adafactor). Cases: see
``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adafactor"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adafactor_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
