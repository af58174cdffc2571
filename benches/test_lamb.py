"""One ``step()`` of ferroptim.LAMB vs pytorch_optimizer.Lamb (lr 1e-3, decoupled weight
decay 0.01), the reference's default flavour and its for-loop (torch has no LAMB).
Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["lamb"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_lamb_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
