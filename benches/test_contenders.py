"""The contenders of a suite do the same work: checks, not timings (small cases only).

Every contender of an optimizer suite leaves the same parameters after a few calls,
contenders that rewrite gradients get the case's gradients back before every call,
and the clip contenders leave the gradients as they found them (coefficient 1).
"""

from __future__ import annotations

import pytest
import torch
from harness import SUITES, case_data, fresh_params

CASE = "1000x1K"
CALLS = 3

#: adamw_options contenders that step on unscaled gradients (GradScaler's 1/65536).
UNSCALED = {"grad_scale", "GradScaler.step", "torch unscale+fused", "torch GradScaler.step"}


def run(suite_name: str, contender: str) -> list[torch.Tensor]:
    """The parameters after ``CALLS`` calls; asserts the gradients are the case's
    again once ``prepare`` has run."""
    params = fresh_params(CASE)
    runner = SUITES[suite_name].contenders(CASE)[contender](params)
    for _ in range(CALLS):
        runner()
    if runner.prepare is not None:
        runner.prepare()
    _, grads = case_data(CASE)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    return [p.detach() for p in params]


@pytest.mark.parametrize(
    "suite_name",
    [
        "sgd",
        "adagrad",
        "rmsprop",
        "adamax",
        "nadam",
        "radam",
        "adadelta",
        "adamw_clip",
        "adamw_options",
    ],
)
def test_same_result(suite_name: str) -> None:
    suite = SUITES[suite_name]
    names = [n for n in suite.contenders(CASE) if n != "floor"]
    groups: dict[bool, list[str]] = {}
    for name in names:
        groups.setdefault(name in UNSCALED and suite_name == "adamw_options", []).append(name)
    for members in groups.values():
        first = run(suite_name, members[0])
        for other in members[1:]:
            got = run(suite_name, other)
            for a, b in zip(first, got, strict=True):
                torch.testing.assert_close(
                    b, a, rtol=1e-5, atol=1e-7, msg=f"{other} vs {members[0]}"
                )


def test_options_step() -> None:
    """Every options contender moves the parameters (none is skipped as non-finite)."""
    values, _ = case_data(CASE)
    for name in SUITES["adamw_options"].contenders(CASE):
        after = run("adamw_options", name)
        assert not torch.equal(after[0], values[0]), name


@pytest.mark.parametrize("contender", list(SUITES["clip"].contenders(CASE)))
def test_clip_keeps_grads(contender: str) -> None:
    if contender == "floor":
        return
    params = fresh_params(CASE)
    SUITES["clip"].contenders(CASE)[contender](params)()
    _, grads = case_data(CASE)
    for p, g in zip(params, grads, strict=True):
        assert p.grad is not g  # its own copy
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
