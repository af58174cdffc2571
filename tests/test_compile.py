"""ferroptim under ``torch.compile``.

* A compiled model trains with a ferroptim optimizer to the eager model's numbers.
* ``opt.step()`` called inside a compiled function runs eagerly, in Rust, at exactly one
  graph break (ferroptim wraps it in ``torch.compiler.disable``), without recompiling
  on later calls.

Compilation is slow on two cores: the models are tiny, the step-inside tests use a
counting backend (no code generation) and only the compiled-model test uses inductor.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
from _kernels import kernel_calls
from conftest import ferroptim, runs_in_rust, train_cases
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

#: (ferroptim class, kwargs): every optimizer of the registry, state buffers in play.
FAMILIES: dict[str, tuple[type, dict[str, Any]]] = {
    name: (family.ferro, {**family.fixed, **kwargs})
    for name, (family, kwargs) in train_cases().items()
}


def expected_calls(family: str, steps: int) -> int:
    """Calls into the Rust kernels for ``steps`` steps of one group (none where the
    family steps through torch's implementation)."""
    return steps if runs_in_rust(family) else 0


NAMES = tuple(FAMILIES)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Every test starts with no compiled code, no counters, and torch on one thread
    (its spin-waiting OpenMP workers are slow on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        torch._dynamo.reset()
        counters.clear()
        torch.set_num_threads(threads)


def make_model(seed: int = 0) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def make_opt(family: str, params: Any) -> torch.optim.Optimizer:
    cls, kwargs = FAMILIES[family]
    return cls(params, **kwargs)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)) for _ in range(n)
    ]


def eager_run(family: str, steps: int) -> tuple[list[float], list[torch.Tensor], Any]:
    model = make_model()
    opt = make_opt(family, model.parameters())
    losses = []
    for x, y in batches(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in model.parameters()], opt


def graph_break_reasons() -> list[str]:
    return list(counters["graph_break"])


# ----------------------------------------------------------------------------------------
# A compiled model
# ----------------------------------------------------------------------------------------

MODEL_STEPS = 15


@pytest.mark.parametrize("family", NAMES)
def test_compiled_model_trains_like_eager(family):
    losses_e, params_e, _ = eager_run(family, MODEL_STEPS)
    model = make_model()
    compiled = torch.compile(model)  # inductor
    opt = make_opt(family, model.parameters())
    losses_c = []
    with kernel_calls() as calls:
        for x, y in batches(MODEL_STEPS):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(compiled(x), y)
            loss.backward()
            opt.step()
            losses_c.append(loss.item())
    assert calls.total() == expected_calls(family, MODEL_STEPS)
    # Inductor fuses and reorders the model's float32 arithmetic: close, not bitwise.
    assert losses_c == pytest.approx(losses_e, rel=1e-4, abs=1e-6)
    assert losses_c[-1] < losses_c[0], "training should make progress"
    for i, (a, b) in enumerate(zip(model.parameters(), params_e, strict=True)):
        torch.testing.assert_close(
            a.detach(), b, rtol=1e-4, atol=1e-5, msg=lambda m, i=i: f"param {i}: {m}"
        )


# ----------------------------------------------------------------------------------------
# opt.step() inside a compiled function
# ----------------------------------------------------------------------------------------

CALLS = 8


@pytest.mark.parametrize("family", NAMES)
def test_step_inside_compiled_function_is_one_graph_break(family):
    """Tensor work before and after ``opt.step()``: two graphs, one break between them,
    the step itself eager and in Rust."""

    def run(compile_it: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, Any]:
        model = make_model()
        params = list(model.parameters())
        opt = make_opt(family, params)
        gen = torch.Generator().manual_seed(7)

        def fn(x: torch.Tensor) -> torch.Tensor:
            y = torch.tanh(x) * 2
            opt.step()
            return model(y).sum()

        backend = CompileCounter()
        f = torch.compile(fn, backend=backend) if compile_it else fn
        outs, frames = [], []
        with kernel_calls() as calls:
            for _ in range(CALLS):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                outs.append(f(torch.randn(4, 8, generator=gen)).detach())
                frames.append(backend.frame_count)
        assert calls.total() == expected_calls(family, CALLS), "not every step ran in Rust"
        return outs, [p.detach().clone() for p in params], opt, frames

    outs_c, params_c, opt_c, frames = run(compile_it=True)
    reasons = graph_break_reasons()
    recompiles = dict(counters["recompiles"])
    outs_e, params_e, opt_e, _ = run(compile_it=False)

    # One graph before the step, one after it; compiled once, never again.
    assert frames == [2] * CALLS, f"graphs compiled after each call: {frames}"
    assert not recompiles, f"recompiled: {recompiles}"
    assert len(reasons) == 1, f"expected one graph break (the step), got: {reasons}"
    assert "torch.compiler.disable" in reasons[0] and "step" in reasons[0], reasons[0]
    for a, b in zip(outs_c, outs_e, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(params_c, params_e, strict=True):
        assert torch.equal(a, b), "the step under torch.compile gave other numbers"
    for (_, sa), (_, sb) in zip(opt_c.state.items(), opt_e.state.items(), strict=True):
        assert set(sa) == set(sb)
        for key in sb:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("family", NAMES)
def test_compiled_train_step(family):
    """A whole train step compiled: forward, backward, ``opt.step()``. Matches eager and
    stops compiling after the first call."""
    model = make_model()
    opt = make_opt(family, model.parameters())
    backend = CompileCounter()

    @torch.compile(backend=backend)
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    losses, frames = [], []
    with kernel_calls() as calls:
        for x, y in batches(CALLS):
            opt.zero_grad()
            losses.append(train_step(x, y).item())
            frames.append(backend.frame_count)
    assert calls.total() == expected_calls(family, CALLS)
    assert frames[1:] == [frames[1]] * (CALLS - 1), f"recompiled after warm-up: {frames}"
    assert not dict(counters["recompiles"]), dict(counters["recompiles"])
    step_breaks = [r for r in graph_break_reasons() if "torch.compiler.disable" in r]
    assert len(step_breaks) == 1, graph_break_reasons()

    losses_e, params_e, opt_e = eager_run(family, CALLS)
    assert losses == pytest.approx(losses_e, rel=1e-6, abs=1e-7)
    for a, b in zip(model.parameters(), params_e, strict=True):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-7)
    assert [float(s["step"]) for s in opt.state.values() if "step" in s] == [
        float(s["step"]) for s in opt_e.state.values() if "step" in s
    ]


def test_step_in_compiled_function_with_max_grad_norm_and_skip():
    """The extra keywords work through the eager step too: clipping applied, a nan step
    skipped."""
    model = make_model()
    params = list(model.parameters())
    opt = ferroptim.AdamW(params, lr=1e-2, max_grad_norm=0.1, skip_nonfinite=True)

    @torch.compile(backend=CompileCounter())
    def step_and_sum(x: torch.Tensor) -> torch.Tensor:
        y = x + 1
        opt.step()
        return y.sum()

    for p in params:
        p.grad = torch.ones_like(p)
    step_and_sum(torch.zeros(3))
    assert opt.last_grad_norm is not None and float(opt.last_grad_norm) > 0.1
    before = [p.detach().clone() for p in params]
    params[0].grad[0, 0] = float("nan")
    step_and_sum(torch.zeros(3))
    assert opt.skipped_steps == 1
    for a, b in zip(params, before, strict=True):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("family", NAMES)
def test_compiled_step_with_tensor_lr_and_scheduler(family):
    """torch's recipe for compiling an optimizer step: ``torch.compile`` a function that
    calls ``opt.step()``, the learning rate a tensor so a scheduler does not recompile.
    Compiled and eager ferroptim agree bitwise and match torch.optim."""

    def run(cls: type, compiled: bool, **extra: Any) -> tuple[list[torch.Tensor], Any]:
        torch._dynamo.reset()
        counters.clear()
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (50, 7, 300)]
        kwargs = {k: v for k, v in FAMILIES[family][1].items() if k != "lr"}
        opt = cls(params, lr=torch.tensor(0.01), **kwargs, **extra)
        sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=5)
        backend = CompileCounter()

        def fn() -> None:
            opt.step()

        f = torch.compile(fn, backend=backend) if compiled else fn
        for _ in range(CALLS):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            f()
            sched.step()
        return [p.detach().clone() for p in params], dict(counters["recompiles"])

    ferro_cls = FAMILIES[family][0]
    # (torch.optim's class, or the reference of an optimizer torch lacks: the registry's)
    torch_cls = train_cases()[family][0].torch
    with kernel_calls() as calls:
        compiled, recompiles = run(ferro_cls, True)
    assert calls.total() == expected_calls(family, CALLS)
    assert not recompiles, recompiles
    eager, _ = run(ferro_cls, False)
    reference, _ = run(torch_cls, False, foreach=False)
    for a, b, c in zip(compiled, eager, reference, strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)
