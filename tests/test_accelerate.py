"""ferroptim under Hugging Face accelerate (CPU, a few steps of a tiny model).

accelerate reports an fp16 overflow through ``optimizer.step_was_skipped``: it wraps the
optimizer's ``step`` and calls ``scaler.step``; when GradScaler does not call ``step``
(inf/nan gradients) the step was skipped. That only works for an optimizer GradScaler
unscales itself, i.e. torch's default (non-fused) optimizers and ferroptim's defaults.

Limit on CPU: ``Accelerator(mixed_precision="fp16")`` creates no GradScaler on a CPU
device in accelerate 1.x (fp16 needs an accelerator device there), so the tests hand
accelerate a CPU ``torch.amp.GradScaler`` as ``accelerator.scaler`` before ``prepare``:
``accelerator.backward`` and the prepared optimizer's ``step`` then run accelerate's own
GradScaler code. ``accelerator.unscale_gradients`` is tied to fp16 on a device, so
clipping unscales with the scaler directly first, as a CPU user would.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from conftest import ferroptim

pytestmark = pytest.mark.usefixtures("torch_single_threaded")


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """accelerate keeps one process-wide state (mixed precision included) and refuses a
    second Accelerator with other settings; its own tests reset it the same way."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


ADAMW = {"lr": 1e-2, "weight_decay": 0.1}
STEPS = 8
OVERFLOW_AT = (2, 5, 6)  # steps whose loss is scaled to inf: two skips in a row
CLIP = 0.05


def model() -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return net


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen))] * STEPS


def train(
    cls: type[torch.optim.Optimizer], *, clip: bool = False, **opt_kwargs: Any
) -> dict[str, Any]:
    accelerator = Accelerator(cpu=True)
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    net = model()
    net, opt = accelerator.prepare(net, cls(net.parameters(), **ADAMW, **opt_kwargs))
    skipped, scales = [], []
    for step, (x, y) in enumerate(batches()):
        loss = torch.nn.functional.mse_loss(net(x), y)
        if step in OVERFLOW_AT:
            loss = loss * float("inf")
        accelerator.backward(loss)
        if clip:
            accelerator.scaler.unscale_(opt.optimizer)
            accelerator.clip_grad_norm_(net.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        skipped.append(opt.step_was_skipped)
        scales.append(accelerator.scaler.get_scale())
    inner = opt.optimizer
    steps = {float(s["step"]) for s in inner.state.values()}
    return {"skipped": skipped, "scales": scales, "params": list(net.parameters()), "steps": steps}


@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
def test_step_was_skipped_reports_fp16_overflow(clip):
    ferro = train(ferroptim.AdamW, clip=clip)
    ref = train(torch.optim.AdamW, clip=clip)
    expected = [step in OVERFLOW_AT for step in range(STEPS)]
    assert ferro["skipped"] == ref["skipped"] == expected
    assert ferro["scales"] == ref["scales"]
    # Skipped steps left the optimizer state alone: one step counted per real step.
    assert ferro["steps"] == ref["steps"] == {float(STEPS - len(OVERFLOW_AT))}
    for i, (a, b) in enumerate(zip(ferro["params"], ref["params"], strict=True)):
        torch.testing.assert_close(
            a.detach(), b.detach(), rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}"
        )


def test_fused_is_like_torch_fused():
    """With fused=True the optimizer takes GradScaler's scale and skips inside its own
    step, so accelerate never sees a skip: the same for torch's fused AdamW. The steps
    are still skipped (the state counts only the finite ones)."""
    ferro = train(ferroptim.AdamW, fused=True)
    ref = train(torch.optim.AdamW, fused=True)
    assert ferro["skipped"] == ref["skipped"] == [False] * STEPS
    assert ferro["scales"] == ref["scales"]
    assert ferro["steps"] == ref["steps"] == {float(STEPS - len(OVERFLOW_AT))}
    for a, b in zip(ferro["params"], ref["params"], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_with_clipping_matches_torch():
    """accelerate's CPU mixed precision (bf16 autocast, no scaler) with its
    clip_grad_norm_."""
    out = {}
    for cls in (ferroptim.AdamW, torch.optim.AdamW):
        AcceleratorState._reset_state(reset_partial_state=True)
        accelerator = Accelerator(cpu=True, mixed_precision="bf16")
        net = model()
        net, opt = accelerator.prepare(net, cls(net.parameters(), **ADAMW))
        norms = []
        for x, y in batches():
            with accelerator.autocast():
                loss = torch.nn.functional.mse_loss(net(x).float(), y)
            accelerator.backward(loss)
            norms.append(float(accelerator.clip_grad_norm_(net.parameters(), CLIP)))
            opt.step()
            opt.zero_grad()
            assert not opt.step_was_skipped
        out[cls] = ([p.detach().clone() for p in net.parameters()], norms)
    (pf, nf), (pt, nt) = out[ferroptim.AdamW], out[torch.optim.AdamW]
    assert min(nt) > CLIP  # clipping changed every step
    torch.testing.assert_close(nf, nt, rtol=1e-2, atol=1e-4)
    for a, b in zip(pf, pt, strict=True):
        # bf16 autocast: a last-bit param difference can move an activation a bf16 ulp.
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
