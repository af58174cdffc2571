"""One ``step()`` of ferroptim.Adamax vs torch.optim.Adamax: foreach, for-loop,
default (torch has no fused Adamax). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adamax"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adamax_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
