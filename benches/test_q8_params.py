"""One ``step()`` of ferroptim.AdamW on a bfloat16 model with 8-bit states
(``state_dtype="8bit", stochastic_rounding=True``) vs torch's AdamW on the float32 model.
Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["q8_params"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_q8_params_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
