"""One ``step()`` of ferroptim.NAdam vs torch.optim.NAdam (lr 2e-3, decoupled weight decay
0.01): foreach, for-loop, default (torch has no fused NAdam). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["nadam"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_nadam_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
