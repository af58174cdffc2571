"""ferroptim.clip_grad_norm_ vs torch.nn.utils.clip_grad_norm_ (foreach, for-loop,
default), max_norm 1e9: the coefficient is 1.0, so the gradients stay the same.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["clip"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_clip_grad_norm(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
