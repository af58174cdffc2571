"""One ``step()`` of ferroptim.NAdam on a bfloat16 model without keywords (torch's
for-loop semantics, every op rounded, stepped in Rust: 14 bytes/element) vs torch's
NAdam for-loop and foreach on the same bfloat16 params, and ferroptim on the float32
model. Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["bf16_nadam"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_bf16_nadam_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
