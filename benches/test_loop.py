"""The loop suite (``training_loop.py``), on small models: every contender trains, is timed,
and ends where torch's fused optimizer ends; ``report.py --suite loop --quick`` prints it."""

from __future__ import annotations

import pytest
import report
import torch
from training_loop import LOOP_OPTIMIZERS, QUICK_MODELS, params_of, run_loop

ROUNDS = 3


@pytest.mark.parametrize("family", list(LOOP_OPTIMIZERS))
@pytest.mark.parametrize("model", list(QUICK_MODELS))
def test_loop_trains_like_torch(model: str, family: str) -> None:
    spec = QUICK_MODELS[model]()
    result = run_loop(spec, family, LOOP_OPTIMIZERS[family], rounds=ROUNDS, warmup=1)
    assert list(result.trainers)[:2] == ["ferroptim", "torch fused"]
    for name, trainer in result.trainers.items():
        assert len(trainer.step) == len(trainer.iteration) == ROUNDS, name
        assert all(
            0 < s < i for s, i in zip(trainer.step.times, trainer.iteration.times, strict=True)
        ), name
        # The same iterations on the same batch: the loss goes down for every contender.
        assert trainer.losses[-1] < trainer.losses[0], name
    reference = params_of(result, "torch fused")
    assert not all(
        torch.equal(a, b) for a, b in zip(reference, spec_initial(model), strict=True)
    ), "the optimizer moved nothing"
    for name in result.trainers:
        # ferroptim follows torch's fused kernel closely; torch's foreach and for-loop
        # flavours round differently from its fused one (AdamW's early steps amplify it).
        atol = 1e-6 if name == "ferroptim" else 2e-4
        for a, b in zip(params_of(result, name), reference, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=atol, msg=name)


def spec_initial(model: str) -> list[torch.Tensor]:
    """The model's initial parameters, as ``run_loop`` builds them (seed 0)."""
    torch.manual_seed(0)
    return [p.detach() for p in QUICK_MODELS[model]().build().parameters()]


def test_report_prints_the_loop_suite(capsys: pytest.CaptureFixture[str]) -> None:
    report.main(["--suite", "loop", "--quick"])
    out = capsys.readouterr().out
    assert "## The step inside a real training loop" in out
    for model in QUICK_MODELS:
        for family in LOOP_OPTIMIZERS:
            assert f"| loop {family}" in out and f"| {model} " in out
    assert "floor vs fused" in out and "floor vs best" in out
