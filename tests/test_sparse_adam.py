"""SparseAdam: torch.optim.SparseAdam's results from a Rust step over the touched rows.

torch's float64 ``sqrt`` (like its vectorised float32 one) is not always correctly
rounded, and ferroptim's is: results are compared with torch within its tolerance and, in
float32, against an exact float64 shadow (ferroptim at least as close as torch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import assert_unchanged, ferroptim, rust_calls, snapshot, tol

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks")

STEPS = 200
ROWS, DIM = 300, 37  # rows wider than any SIMD width, a ragged tail


class Model(torch.nn.Module):
    """Two sparse embeddings (one 1-D sparse, one hybrid with a 2-D dense part)."""

    def __init__(self, dtype: torch.dtype, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.words = torch.nn.Embedding(ROWS, DIM, sparse=True, dtype=dtype)
        self.tags = torch.nn.Embedding(50, 3, sparse=True, dtype=dtype)

    def forward(self, words: torch.Tensor, tags: torch.Tensor) -> torch.Tensor:
        return self.words(words).sum(1).pow(2).sum(1) + self.tags(tags).sum(1).sin().sum(1)


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    # Repeated indices (uncoalesced gradients), rows untouched for many steps.
    return [
        (torch.randint(0, ROWS, (6, 7), generator=gen), torch.randint(0, 50, (6, 2), generator=gen))
        for _ in range(n)
    ]


def train(
    make: Callable[[list[Any]], torch.optim.Optimizer],
    dtype: torch.dtype,
    steps: int = STEPS,
    groups: bool = False,
) -> tuple[Model, torch.optim.Optimizer]:
    model = Model(dtype)
    params: list[Any] = (
        [{"params": [model.words.weight]}, {"params": [model.tags.weight], "lr": 0.05}]
        if groups
        else list(model.parameters())
    )
    opt = make(params)
    for words, tags in batches(steps):
        opt.zero_grad()
        model(words, tags).sum().backward()
        if groups and len(words) % 2:  # (never: keeps the grads of both)
            model.tags.weight.grad = None
        opt.step()
    return model, opt


KWARGS = [
    {},
    {"lr": 0.01, "maximize": True},
    {"lr": 0.02, "betas": (0.6, 0.9), "eps": 1e-6},
    {"lr": torch.tensor(0.01)},
]


def _max_error(model: Model, shadow: Model) -> float:
    return max(
        (p.double() - s).abs().max().item()
        for p, s in zip(model.parameters(), shadow.parameters(), strict=True)
    )


@pytest.mark.parametrize("kwargs", KWARGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_matches_torch_and_is_as_exact(kwargs: dict[str, Any], dtype: torch.dtype) -> None:
    with rust_calls() as calls:
        ours, fopt = train(lambda p: ferroptim.SparseAdam(p, **kwargs), dtype)
    assert calls["sparse_adam_step"] == 2 * STEPS  # every step of both params in Rust
    theirs, topt = train(lambda p: torch.optim.SparseAdam(p, **kwargs), dtype)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol(dtype))
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(fopt.state[p][key], topt.state[q][key], **tol(dtype))
        assert fopt.state[p]["step"] == topt.state[q]["step"] == STEPS
        assert type(fopt.state[p]["step"]) is int
    if dtype == torch.float32:
        shadow, _ = train(lambda p: torch.optim.SparseAdam(p, **kwargs), torch.float64)
        ours_error, torch_error = _max_error(ours, shadow), _max_error(theirs, shadow)
        assert ours_error <= torch_error * 1.5 + 1e-7, (ours_error, torch_error)


def test_groups_and_params_without_grads() -> None:
    kwargs = {"lr": 0.01}
    ours, _ = train(lambda p: ferroptim.SparseAdam(p, **kwargs), torch.float32, 60, groups=True)
    theirs, _ = train(lambda p: torch.optim.SparseAdam(p, **kwargs), torch.float32, 60, groups=True)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol(torch.float32))
    weight = torch.nn.Parameter(torch.ones(4, 5))
    opt = ferroptim.SparseAdam([weight, torch.nn.Parameter(torch.ones(3))])
    weight.grad = torch.sparse_coo_tensor(torch.tensor([[1, 3, 1]]), torch.ones(3, 5), (4, 5))
    opt.step()  # the second param has no grad: untouched, no state
    assert len(opt.state) == 1 and opt.state[weight]["step"] == 1
    assert torch.equal(weight[0], torch.ones(5)) and not torch.equal(weight[1], torch.ones(5))


def _sparse(indices: list[list[int]], values: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor(indices), values, size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hand_made_gradients(dtype: torch.dtype) -> None:
    """Fully sparse 2-D gradients, duplicates, empty gradients and a 3-D hybrid one."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 33), (7, 9, 17), (25,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    fopt = ferroptim.SparseAdam(ours, lr=0.03)
    topt = torch.optim.SparseAdam(theirs, lr=0.03)
    for step in range(80):
        grads = []
        for shape in shapes:
            nnz = 0 if step % 11 == 5 else int(torch.randint(1, 30, (), generator=gen))
            # all sparse dims but a dense last one for 3-D params; fully sparse otherwise
            sparse_dims = 2 if len(shape) == 3 else len(shape)
            indices = [
                torch.randint(0, shape[d], (nnz,), generator=gen).tolist()
                for d in range(sparse_dims)
            ]
            values = torch.randn((nnz, *shape[sparse_dims:]), generator=gen, dtype=dtype)
            grads.append(_sparse(indices, values, shape))
        for p, q, g in zip(ours, theirs, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fopt.step()
        topt.step()
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, **tol(dtype))
        torch.testing.assert_close(fopt.state[p]["exp_avg_sq"], topt.state[q]["exp_avg_sq"])


def test_forced_torch_path_is_torch_bitwise() -> None:
    ferroptim.set_backend("torch")
    try:
        with rust_calls() as calls:
            ours, _ = train(lambda p: ferroptim.SparseAdam(p, lr=0.01), torch.float32, 50)
    finally:
        ferroptim.set_backend("auto")
    assert not calls
    theirs, _ = train(lambda p: torch.optim.SparseAdam(p, lr=0.01), torch.float32, 50)
    for p, q in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(p, q)


def test_non_contiguous_param_takes_torchs_path() -> None:
    base = torch.randn(20, 30)
    ours = torch.nn.Parameter(base.t().contiguous().t())  # column-major: not contiguous
    theirs = torch.nn.Parameter(ours.detach().clone())
    assert not ours.is_contiguous()
    fopt, topt = ferroptim.SparseAdam([ours], lr=0.1), torch.optim.SparseAdam([theirs], lr=0.1)
    for step in range(10):
        g = _sparse([[step, 3, step]], torch.randn(3, 30), (20, 30))
        ours.grad, theirs.grad = g.clone(), g.clone()
        with rust_calls() as calls:
            fopt.step()
        topt.step()
        assert not calls
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_and_simd_levels_are_bitwise_equal(threads: int) -> None:
    reference, _ = train(lambda p: ferroptim.SparseAdam(p, lr=0.01), torch.float32, 40)
    old_threads, old_level = ferroptim.get_num_threads(), ferroptim.simd_level()
    try:
        ferroptim.set_num_threads(threads)
        for level in ferroptim.supported_simd_levels():
            ferroptim.set_simd_level(level)
            model, _ = train(lambda p: ferroptim.SparseAdam(p, lr=0.01), torch.float32, 40)
            for p, q in zip(model.parameters(), reference.parameters(), strict=True):
                assert torch.equal(p, q), level
    finally:
        ferroptim.set_num_threads(old_threads)
        ferroptim.set_simd_level(old_level)


def test_state_dict_interop_both_ways() -> None:
    words = batches(60)
    for first, second in [
        (torch.optim.SparseAdam, ferroptim.SparseAdam),
        (ferroptim.SparseAdam, torch.optim.SparseAdam),
    ]:
        model, switched = Model(torch.float32), Model(torch.float32)
        opt = first(model.parameters(), lr=0.01)
        opt_switched = first(switched.parameters(), lr=0.01)
        for i, (w, t) in enumerate(words):
            if i == 30:
                state = opt_switched.state_dict()
                opt_switched = second(switched.parameters(), lr=0.01)
                opt_switched.load_state_dict(state)
            for m, o in ((model, opt), (switched, opt_switched)):
                o.zero_grad()
                m(w, t).sum().backward()
                o.step()
        for p, q in zip(model.parameters(), switched.parameters(), strict=True):
            torch.testing.assert_close(p, q, **tol(torch.float32))
        saved = opt_switched.state_dict()["state"][0]
        assert saved["step"] == 60 and set(saved) == {"step", "exp_avg", "exp_avg_sq"}


def test_dense_gradient_raises_torchs_error_before_writing() -> None:
    sparse_param = torch.nn.Parameter(torch.randn(6, 4))
    dense_param = torch.nn.Parameter(torch.randn(3))
    opt = ferroptim.SparseAdam([{"params": [sparse_param]}, {"params": [dense_param]}])
    sparse_param.grad = _sparse([[0, 2]], torch.ones(2, 4), (6, 4))
    dense_param.grad = torch.ones(3)
    opt.step_count = 0
    before = snapshot(opt, [sparse_param, dense_param])
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        opt.step()
    assert_unchanged(before, opt, [sparse_param, dense_param])
    # torch raises the same error (after stepping the first group).
    topt = torch.optim.SparseAdam([{"params": [sparse_param]}, {"params": [dense_param]}])
    with pytest.raises(RuntimeError, match="does not support dense gradients"):
        topt.step()


def test_constructor_errors_are_torchs() -> None:
    for kwargs in ({"lr": -1.0}, {"eps": 0.0}, {"betas": (1.0, 0.9)}):
        with pytest.raises(ValueError) as ours:
            ferroptim.SparseAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)
        with pytest.raises(ValueError) as theirs:
            torch.optim.SparseAdam([torch.nn.Parameter(torch.ones(2))], **kwargs)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(TypeError):
        opt = ferroptim.SparseAdam([torch.nn.Parameter(torch.ones(2, 2))])
        opt.param_groups[0]["lr"] = None
        opt.param_groups[0]["params"][0].grad = _sparse([[0]], torch.ones(1, 2), (2, 2))
        opt.step()


@pytest.mark.parametrize(
    "offsets, why",
    [
        ([0, 9], "outside"),  # the last row ends past the param
        ([4, 0], "or not after"),  # decreasing
        ([0, 2], "or not after"),  # overlapping rows
        ([-4, 0], "outside"),
    ],
)
def test_row_plans_refuse_rows_outside_the_param(offsets: list[int], why: str) -> None:
    import numpy as np

    param = torch.zeros(3, 4)
    states = [torch.zeros(3, 4), torch.zeros(3, 4)]
    values = torch.ones(2, 4)
    with pytest.raises(ValueError, match=why):
        ferroptim._core.GroupPlan.from_rows(
            param, states, values, np.array(offsets, dtype=np.int64), 4
        )
    plan = ferroptim._core.GroupPlan.from_rows(
        param, states, values, np.array([0, 8], dtype=np.int64), 4
    )
    group = {"lr": 1.0, "betas": (0.9, 0.999), "eps": 1e-8, "maximize": False, "step": 1}
    ferroptim._core.Kernel("sparse_adam", group).step(plan)
    assert (param[0] < 0).all() and (param[2] < 0).all() and (param[1] == 0).all()
    with pytest.raises(ValueError):  # values that do not fill the rows
        ferroptim._core.GroupPlan.from_rows(
            param, states, torch.ones(3, 4), np.array([0, 4], dtype=np.int64), 4
        )
    with pytest.raises(ValueError):  # a state aliasing the param
        ferroptim._core.GroupPlan.from_rows(
            param, [param, states[1]], values, np.array([0, 4], dtype=np.int64), 4
        )


def test_skip_nonfinite_and_max_grad_norm() -> None:
    param = torch.nn.Parameter(torch.randn(10, 8))
    opt = ferroptim.SparseAdam([param], skip_nonfinite=True)
    param.grad = _sparse([[1, 4]], torch.tensor([[float("nan")] * 8, [1.0] * 8]), (10, 8))
    before = snapshot(opt, [param])
    opt.step()
    assert opt.skipped_steps == 1
    assert_unchanged(before, opt, [param])

    ours = torch.nn.Parameter(torch.randn(10, 8))
    theirs = torch.nn.Parameter(ours.detach().clone())
    fopt = ferroptim.SparseAdam([ours], lr=0.1, max_grad_norm=0.5)
    topt = torch.optim.SparseAdam([theirs], lr=0.1)
    for step in range(20):
        g = _sparse([[step % 10, 3, 7]], torch.randn(3, 8), (10, 8)).coalesce()
        ours.grad, theirs.grad = g.clone(), g.clone()
        fopt.step()
        torch.nn.utils.clip_grad_norm_([theirs], 0.5)
        topt.step()
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))


def test_grad_scaler_unscales_sparse_gradients_as_for_torch() -> None:
    runs = []
    for cls in (ferroptim.SparseAdam, torch.optim.SparseAdam):
        model = Model(torch.float32)
        # (a large eps: Adam's update depends on the gradients' scale, so a step that
        # saw the scaled gradients would be far off)
        opt = cls(model.parameters(), lr=0.01, eps=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        for words, tags in batches(30):
            opt.zero_grad()
            scaler.scale(model(words, tags).sum()).backward()
            scaler.step(opt)
            scaler.update()
        runs.append(model)
    for p, q in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        torch.testing.assert_close(p, q, **tol(torch.float32))


def test_state_replaced_mid_training_is_rechecked_every_step() -> None:
    """Every step re-inspects the param, its state and the gradient: a state buffer
    replaced by a non-contiguous copy takes torch's path (torch's numbers), and one of
    the wrong size raises as torch does, with nothing of ferroptim's written first."""
    ours = torch.nn.Parameter(torch.randn(12, 5))
    theirs = torch.nn.Parameter(ours.detach().clone())
    fopt, topt = ferroptim.SparseAdam([ours], lr=0.1), torch.optim.SparseAdam([theirs], lr=0.1)
    for step in range(6):
        g = _sparse([[step, 11, step]], torch.randn(3, 5), (12, 5))
        ours.grad, theirs.grad = g.clone(), g.clone()
        if step == 3:
            for opt, p in ((fopt, ours), (topt, theirs)):
                state = opt.state[p]
                state["exp_avg"] = state["exp_avg"].t().contiguous().t()  # column-major
        with rust_calls() as calls:
            fopt.step()
        topt.step()
        assert bool(calls) == (step < 3)
    # (the first steps ran in Rust, correctly rounded: torch's vectorised float32 sqrt and
    # division are an ulp off on some CPUs, e.g. this AMD EPYC's AVX2 kernels)
    torch.testing.assert_close(ours, theirs, **tol(torch.float32))
    fopt.state[ours]["exp_avg_sq"] = torch.zeros(3, 5)
    ours.grad = _sparse([[0, 11]], torch.ones(2, 5), (12, 5))
    before = ours.detach().clone()
    with pytest.raises(RuntimeError):
        fopt.step()
    # (torch's own ops raise on the mismatched state before the param's update)
    assert torch.equal(ours, before)
