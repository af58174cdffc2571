"""What is specific to ferroptim.Adafactor (the registry entry in ``optim_db`` brings the
rest): factored moments over the last two dims (batch dims kept) against vectors and
scalars, ragged and degenerate shapes (1xN, Nx1), hundreds of steps against torch's
for-loop and an exact float64 shadow, torch's ``eps1=None`` rule, missing grads,
groups, checkpoints both ways, non-contiguous params, threads and SIMD levels, and
torch's errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _kernels import kernel_calls
from conftest import (
    assert_tensors_as_exact_as_torch,
    assert_unchanged,
    ferroptim,
    randn64,
    snapshot,
    tol,
)

#: Scalars, vectors, matrices wider than any SIMD width with ragged tails, 1xN, Nx1,
#: batched (3-D and 4-D), and one matrix spanning several 64K-element chunks.
SHAPES: tuple[tuple[int, ...], ...] = (
    (),
    (1,),
    (37,),
    (1000,),
    (3, 5),
    (1, 131),
    (131, 1),
    (67, 45),
    (2, 3, 33, 17),
    (4, 1, 1000),
    (3, 7, 1),
    (300, 700),
)

CASES = {
    "defaults": {},
    "maximize-wd": {"maximize": True, "weight_decay": 0.05},
    "eps-d-beta2": {"eps": (1e-15, 1e-2), "d": 2.5, "beta2_decay": -0.5, "lr": 0.05},
    "tensor-lr": {"lr": torch.tensor(0.02), "weight_decay": 0.1},
    "big-lr-clipped": {"lr": 0.5, "d": 1.0},
}


def make_params(dtype: torch.dtype, shapes=SHAPES, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in shapes
    ]


def grad_stream(
    shapes, dtype: torch.dtype, steps: int, none_every: int = 0, seed: int = 1
) -> list[list[torch.Tensor | None]]:
    """Grads per step (float64 draws rounded to ``dtype``); with ``none_every``, param i
    has no grad on the steps where ``(step + i) % none_every == 0``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads: list[torch.Tensor | None] = []
        for i, s in enumerate(shapes):
            g = randn64(s, gen) * 10.0 ** ((i % 4) - 2)
            grads.append(None if none_every and (step + i) % none_every == 0 else g.to(dtype))
        out.append(grads)
    return out


def run(
    make_opt: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    dtype: torch.dtype,
    stream: list[list[torch.Tensor | None]],
    shapes=SHAPES,
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = make_params(dtype, shapes)
    opt = make_opt(params)
    for grads in stream:
        for p, g in zip(params, grads, strict=True):
            p.grad = None if g is None else g.to(dtype).clone()
        opt.step()
    return params, opt


def tensors(params, opt) -> list[torch.Tensor]:
    return [p.detach() for p in params] + [
        opt.state[p][k] for p in params for k in sorted(opt.state[p]) if k != "step"
    ]


def shadow_kwargs(kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """The same algorithm in float64: ``eps1=None`` is ``finfo(float32).eps`` there too."""
    eps1, eps2 = kwargs.get("eps", (None, 1e-3))
    lr = kwargs.get("lr", 1e-2)
    return {
        **kwargs,
        "eps": (torch.finfo(dtype).eps if eps1 is None else eps1, eps2),
        "lr": lr.double() if isinstance(lr, torch.Tensor) else lr,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_hundreds_of_steps_match_torch_and_the_float64_shadow(case, dtype):
    kwargs = CASES[case]
    stream = grad_stream(SHAPES, dtype, 200, none_every=7)
    with kernel_calls() as calls:
        fp, fo = run(lambda ps: ferroptim.Adafactor(ps, **kwargs), dtype, stream)
    assert calls["adafactor_step"] == 200, "every step ran in Rust"
    tp, to = run(lambda ps: torch.optim.Adafactor(ps, **kwargs), dtype, stream)
    for a, b in zip(fp, tp, strict=True):
        assert list(fo.state[a]) == list(to.state[b])
        assert float(fo.state[a]["step"]) == float(to.state[b]["step"])
        assert fo.state[a]["step"].dtype == to.state[b]["step"].dtype
        for key, value in to.state[b].items():
            assert fo.state[a][key].shape == value.shape, key
            assert fo.state[a][key].dtype == value.dtype, key
    factored = [p for p in fp if p.dim() > 1]
    assert all(set(fo.state[p]) == {"step", "row_var", "col_var"} for p in factored)
    assert all(set(fo.state[p]) == {"step", "variance"} for p in fp if p.dim() <= 1)

    def shadow() -> list[torch.Tensor]:
        return tensors(
            *run(
                lambda ps: torch.optim.Adafactor(ps, **shadow_kwargs(kwargs, dtype)),
                torch.float64,
                stream,
            )
        )

    assert_tensors_as_exact_as_torch(tensors(fp, fo), tensors(tp, to), shadow)


def test_vectors_are_bitwise_torchs_for_loop():
    """Without reductions of their own beyond two norms, vectors and scalars step to
    torch's bits where torch's norms are exact (float64 sums of few float64 squares
    round the same): float64, defaults."""
    shapes = ((), (1,), (2,))
    stream = grad_stream(shapes, torch.float64, 50)
    fp, _ = run(lambda ps: ferroptim.Adafactor(ps), torch.float64, stream, shapes)
    tp, _ = run(lambda ps: torch.optim.Adafactor(ps), torch.float64, stream, shapes)
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-15, atol=0)


def test_eps1_none_is_the_first_params_dtype():
    """torch's for-loop sets ``eps1`` from the first param with a grad and keeps it for
    the group: a float64 param first gives float64's eps to the float32 one too."""
    a = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(4, 3))
    a2, b2 = copy.deepcopy(a), copy.deepcopy(b)
    fo = ferroptim.Adafactor([a, b])
    to = torch.optim.Adafactor([a2, b2], foreach=False)
    for step in range(3):
        # tiny grads: the clamps at eps1 decide the update
        g = torch.full((4, 3), 1e-9, dtype=torch.float64) * (step + 1)
        a.grad, a2.grad = g.clone(), g.clone()
        b.grad, b2.grad = g.float(), g.float()
        fo.step()
        to.step()
    torch.testing.assert_close(b.detach(), b2.detach(), **tol(torch.float32))
    torch.testing.assert_close(a.detach(), a2.detach(), **tol(torch.float64))
    assert not torch.equal(b.detach(), torch.zeros(4, 3))


def test_groups_and_missing_grads():
    stream = grad_stream(SHAPES, torch.float32, 60, none_every=3)

    def groups(ps):
        return [
            {"params": ps[::2]},
            {"params": ps[1::2], "lr": 0.05, "beta2_decay": -0.6, "d": 2.0, "weight_decay": 0.1},
        ]

    fp, fo = run(lambda ps: ferroptim.Adafactor(groups(ps)), torch.float32, stream)
    tp, to = run(lambda ps: torch.optim.Adafactor(groups(ps)), torch.float32, stream)
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
        assert float(fo.state[a]["step"]) == float(to.state[b]["step"])


@pytest.mark.parametrize("direction", ["torch-to-ferroptim", "ferroptim-to-torch"])
def test_checkpoint_both_ways_mid_training(direction):
    stream = grad_stream(SHAPES, torch.float64, 40)
    kwargs = {"lr": 0.02, "weight_decay": 0.01}

    def first(ps):
        cls = torch.optim.Adafactor if direction == "torch-to-ferroptim" else ferroptim.Adafactor
        return cls(ps, **kwargs)

    def second(ps):
        cls = ferroptim.Adafactor if direction == "torch-to-ferroptim" else torch.optim.Adafactor
        return cls(ps, **kwargs)

    params, opt = run(first, torch.float64, stream[:20])
    saved = copy.deepcopy(opt.state_dict())
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = second(resumed_params)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["param_groups"] == saved["param_groups"]
    for grads in stream[20:]:
        for p, g in zip(resumed_params, grads, strict=True):
            p.grad = g.clone()
        resumed.step()
    ref_params, _ = run(lambda ps: torch.optim.Adafactor(ps, **kwargs), torch.float64, stream)
    for a, b in zip(resumed_params, ref_params, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float64))


def test_non_contiguous_params_and_grads():
    """A transposed matrix and a strided view step in a row-major staged copy: rows and
    columns are the logical ones."""
    gen = torch.Generator().manual_seed(0)
    base = [torch.randn(45, 67, generator=gen), torch.randn(6, 40, generator=gen)]

    def make():
        return [
            torch.nn.Parameter(base[0].clone().t()),  # transposed: dense, not row-major
            torch.nn.Parameter(base[1].clone()[:, ::2]),  # gaps
        ]

    fp, tp = make(), make()
    fo, to = ferroptim.Adafactor(fp, lr=0.05), torch.optim.Adafactor(tp, lr=0.05)
    ggen = torch.Generator().manual_seed(1)
    for _ in range(30):
        for a, b in zip(fp, tp, strict=True):
            g = torch.randn(a.shape, generator=ggen)
            a.grad, b.grad = g.t().contiguous().t(), g.clone()
        fo.step()
        to.step()
    for a, b in zip(fp, tp, strict=True):
        assert a.stride() == b.stride(), "the step kept the param's layout"
        torch.testing.assert_close(a.detach(), b.detach(), **tol(torch.float32))
        for key in ("row_var", "col_var"):
            torch.testing.assert_close(fo.state[a][key], to.state[b][key], **tol(torch.float32))


def test_bitwise_equal_across_threads_and_simd_levels(simd_levels):
    stream = grad_stream(SHAPES, torch.float32, 5)
    kwargs = {"weight_decay": 0.05, "maximize": True}

    def once() -> list[torch.Tensor]:
        return tensors(*run(lambda ps: ferroptim.Adafactor(ps, **kwargs), torch.float32, stream))

    want = once()
    for level in simd_levels:
        ferroptim.set_simd_level(level)
        for threads in (1, 2, 3):
            ferroptim.set_num_threads(threads)
            got = once()
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), (
                f"{level}, {threads} threads"
            )


def test_torch_path_is_torchs_for_loop_bitwise():
    stream = grad_stream(SHAPES[:8], torch.float32, 10)
    ferroptim.set_backend("torch")
    with kernel_calls() as calls:
        fp, _ = run(lambda ps: ferroptim.Adafactor(ps, d=2.0), torch.float32, stream, SHAPES[:8])
    assert not calls["adafactor_step"]
    tp, _ = run(lambda ps: torch.optim.Adafactor(ps, d=2.0), torch.float32, stream, SHAPES[:8])
    assert all(torch.equal(a, b) for a, b in zip(fp, tp, strict=True))


def test_grad_aliasing_its_variance_raises_before_writing():
    ps = make_params(torch.float32, ((50,), (6, 4)))
    opt = ferroptim.Adafactor(ps)
    for step in range(2):
        grads = grad_stream(((50,), (6, 4)), torch.float32, 1, seed=step)[0]
        for p, g in zip(ps, grads, strict=True):
            p.grad = g
        opt.step()
    ps[0].grad = opt.state[ps[0]]["variance"]
    before = snapshot(opt, ps)
    with pytest.raises(RuntimeError, match="shares memory with the optimizer's own state"):
        opt.step()
    assert_unchanged(before, opt, ps)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_raise_torchs_error(dtype):
    p = torch.nn.Parameter(torch.randn(4, 3, dtype=dtype))
    q = torch.nn.Parameter(torch.randn(5))
    opt = ferroptim.Adafactor([q, p])
    p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    before = snapshot(opt, [q, p])
    with pytest.raises(RuntimeError, match="Adafactor does not support complex parameters"):
        opt.step()
    assert_unchanged(before, opt, [q, p])


@pytest.mark.parametrize("shape", [(0, 5), (3, 0), (0,)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_zero_size_params_raise_torchs_error_before_writing(shape, backend):
    """torch divides by ``numel() ** 0.5`` in Python: ZeroDivisionError for an empty
    param. ferroptim raises it before anything is written (on either path)."""
    ferroptim.set_backend(backend)
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.zeros(shape))]
    tps = copy.deepcopy(ps)
    for p, q in zip(ps, tps, strict=True):
        p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
    with pytest.raises(ZeroDivisionError):
        torch.optim.Adafactor(tps).step()
    opt = ferroptim.Adafactor(ps)
    before = snapshot(opt, ps)
    with pytest.raises(ZeroDivisionError):
        opt.step()
    assert_unchanged(before, opt, ps)


def test_signature_and_defaults_are_torchs():
    import inspect

    ours = inspect.signature(ferroptim.Adafactor)
    theirs = inspect.signature(torch.optim.Adafactor)
    extra = {"max_grad_norm", "skip_nonfinite", "nonfinite_group", "ema_decay"}
    assert [n for n in ours.parameters if n not in extra] == list(theirs.parameters)
    for name, param in theirs.parameters.items():
        assert ours.parameters[name].default == param.default, name
        assert ours.parameters[name].kind == param.kind, name
    p = torch.nn.Parameter(torch.zeros(3))
    assert ferroptim.Adafactor([p]).defaults == torch.optim.Adafactor([p]).defaults
    assert isinstance(ferroptim.Adafactor([p]), torch.optim.Adafactor)
