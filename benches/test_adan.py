"""One ``step()`` of ferroptim.Adan vs pytorch_optimizer.Adan (its default foreach
flavour and its for-loop; torch has no Adan). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adan"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adan_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
