"""The cached plans' raw re-check (rust/py/native.rs): torch's metadata layout is found
whatever the default dtype, device or inference mode at import, and turning it off only
costs speed (every step then takes the slow path, with the same results)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import ferroptim


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return result.stdout.strip()


def test_layout_is_recognised_on_this_torch():
    assert ferroptim._core._native_recheck() is True


@pytest.mark.parametrize(
    "setup",
    [
        "torch.set_default_dtype(torch.float64)",
        "torch.set_default_dtype(torch.float16)",
        "torch.inference_mode().__enter__()",
        "torch.set_default_device('meta')",
    ],
)
def test_layout_found_under_unusual_defaults(setup):
    out = _run(
        f"""
        import torch
        {setup}
        import ferroptim
        print(ferroptim._core._native_recheck())
        """
    )
    assert out == "True"


def _cached_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps: int) -> int:
    """Runs ``steps`` steps and counts those whose every group took the cached plan."""
    fast = 0
    for i in range(steps):
        for j, p in enumerate(params):
            p.grad = torch.full_like(p, 0.01 * (i + 1) * (j + 1))
        plans = opt.__dict__.get("_ferro_plans") or {}
        fast += bool(plans) and all(c.plan.gather() for c in plans.values())
        opt.step()
    return fast


def test_disabled_recheck_takes_the_slow_path_with_the_same_results():
    def run(disable: bool) -> tuple[list[torch.Tensor], int]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(37,), (33, 7), (1000,)]]
        opt = ferroptim.AdamW(params, lr=0.01)
        ferroptim._core._native_recheck(disable)
        try:
            fast = _cached_steps(opt, params, 6)
        finally:
            ferroptim._core._native_recheck(False)
        return [p.detach().clone() for p in params], fast

    fast_params, fast_count = run(False)
    slow_params, slow_count = run(True)
    assert fast_count >= 4  # every step after the first two re-checks a cached plan
    assert slow_count == 0
    for a, b in zip(fast_params, slow_params, strict=True):
        assert torch.equal(a, b)


def test_many_dimensions_are_cached():
    """Up to 8 dims are re-checked raw (more than 5 sit outside the TensorImpl)."""
    shapes = [(2, 3, 1, 5, 2), (2, 1, 3, 2, 2, 3), (1, 2, 1, 2, 1, 2, 1, 3)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = ferroptim.SGD(params, lr=0.1, momentum=0.9)
    assert _cached_steps(opt, params, 5) >= 3
