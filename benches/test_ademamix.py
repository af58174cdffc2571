"""One ``step()`` of ferroptim.AdEMAMix vs pytorch_optimizer.AdEMAMix (its default foreach
flavour and its for-loop; torch has no AdEMAMix). Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["ademamix"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_ademamix_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
