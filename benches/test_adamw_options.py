"""Cost of ferroptim.AdamW's options (skip_nonfinite, max_grad_norm, both) and of
GradScaler (in-kernel unscaling, a real GradScaler.step) against the plain step, and
torch's unscale + fused step.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["adamw_options"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_adamw_options_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
