"""ferroptim.LBFGS against torch.optim.LBFGS.

LBFGS has no entry in the optimizer registry (``optim_db.FAMILIES``): every registry
family is stepped with ``opt.step()`` on gradients the tests draw and assign, one
update per step, compared per parameter and per state buffer; LBFGS's ``step(closure)``
evaluates the loss itself up to ``max_eval`` times, keeps one global state entry on the
first parameter (lists of flat tensors, 0-d scalars, counters) and refuses more than one
param group, so none of the registry's suites (flag grids over groups, drawn gradients,
per-parameter state buffers, AMP, clipping, the functional API) applies. Its tests are
here, on real problems (``_lbfgs_problems``): Rosenbrock, least squares, a small MLP.

Numerics: everything but the dot products (and sums) is torch's arithmetic, which
``test_bitwise_with_torchs_dot_products`` checks bit for bit by handing ferroptim torch's
own dot products. Ours accumulate in float64 in a fixed tree, torch's BLAS in the dtype
in another order, so trajectories differ in the last bits: float64 runs are compared
with tight tolerances, float32 runs by their distance to the float64 run, which must be
about torch's own float32 distance.
"""

from __future__ import annotations

import copy
import inspect
import io
from collections.abc import Iterator
from typing import Any

import ferroptim.lbfgs as ferro_lbfgs
import pytest
import torch
from _lbfgs_problems import PROBLEMS, Problem, Trajectory, least_squares, mlp, run
from conftest import ferroptim, structure

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

STEPS = 4
LINE_SEARCHES = [None, "strong_wolfe"]


def _kwargs(problem: str, line_search: str | None, history_size: int) -> dict[str, Any]:
    # A fixed step on Rosenbrock must be small to stay in its valley.
    fixed_lr = 1e-4 if problem == "rosenbrock" else 0.1
    return {
        "lr": 1 if line_search else fixed_lr,
        "history_size": history_size,
        "line_search_fn": line_search,
        "max_iter": 15,
    }


def _state(traj: Trajectory) -> dict[str, Any]:
    return traj.optimizer.state[traj.problem.params[0]]


def _kinds(obj: Any) -> Any:
    """The state's shape: tensors by dtype and shape, containers recursively, numbers by
    type (a 0-d tensor where torch has one, a float where torch has a float)."""
    if isinstance(obj, float | int | bool):
        return type(obj).__name__
    return (
        structure(obj)
        if not isinstance(obj, dict | list)
        else (
            {k: _kinds(v) for k, v in obj.items()}
            if isinstance(obj, dict)
            else [_kinds(v) for v in obj]
        )
    )


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / (1 + b.double().abs().max()))


def _close(
    got: Any, want: Any, rtol: float, path: str = "state", scalar_rtol: float | None = None
) -> None:
    """Same structure, tensors within ``rtol`` (relative to 1 + max |want|), 0-d tensors
    and floats within ``scalar_rtol`` (default ``rtol``)."""
    scalar_rtol = rtol if scalar_rtol is None else scalar_rtol
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype, path
        assert got.shape == want.shape, path
        tol = scalar_rtol if want.dim() == 0 else rtol
        assert _rel(got, want) <= tol, f"{path}: {_rel(got, want):.2e} > {tol:.0e}"
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, rtol, f"{path}[{i}]", scalar_rtol)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), path
        for key in want:
            _close(got[key], want[key], rtol, f"{path}[{key!r}]", scalar_rtol)
    elif isinstance(want, float) and isinstance(got, float):
        assert abs(got - want) <= scalar_rtol * (1 + abs(want)), f"{path}: {got} vs {want}"
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r} vs {want!r}"


def _rtol64(problem: str, line_search: str | None) -> float:
    # Rosenbrock's curved valley with a line search amplifies a last-bit difference in a
    # dot product to ~1e-8 over 60 iterations (measured 7e-9); the other problems stay
    # within 1e-12 of torch.
    return 1e-7 if (problem, line_search) == ("rosenbrock", "strong_wolfe") else 1e-10


# The state's scalars (al[i] = s_i . q * ro[i], ro[i] = 1 / y_i . s_i, the losses) are dot
# products with cancellation: their relative error is the summation error times the
# dot's condition number, measured up to 2e-6 in float64 (al[0] of the MLP after a
# checkpoint round trip), where the vectors they steer agree to 1e-10.
SCALAR_RTOL64 = 1e-5


def test_signature_defaults_and_class() -> None:
    def parameters(fn: Any) -> list[tuple[str, Any, Any]]:
        # (ferroptim's keyword-only `ema_decay` aside)
        return [
            (p.name, p.kind, p.default)
            for p in inspect.signature(fn).parameters.values()
            if not (p.name == "ema_decay" and p.kind is inspect.Parameter.KEYWORD_ONLY)
        ]

    assert parameters(ferroptim.LBFGS.__init__) == parameters(torch.optim.LBFGS.__init__)
    p = torch.nn.Parameter(torch.zeros(3))
    ours, theirs = ferroptim.LBFGS([p]), torch.optim.LBFGS([p])
    assert isinstance(ours, torch.optim.LBFGS)
    assert ours.defaults == theirs.defaults
    assert ours.param_groups[0].keys() == theirs.param_groups[0].keys()
    with pytest.raises(ValueError, match="per-parameter options"):
        ferroptim.LBFGS([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}])
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ferroptim.LBFGS([p], lr=-1.0)


@pytest.mark.parametrize("history_size", [2, 100])
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_float64_matches_torch(problem: str, line_search: str | None, history_size: int) -> None:
    kwargs = _kwargs(problem, line_search, history_size)
    want = run(torch.optim.LBFGS, PROBLEMS[problem](torch.float64), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, PROBLEMS[problem](torch.float64), STEPS, **kwargs)
    rtol = _rtol64(problem, line_search)
    for step, (g, w) in enumerate(zip(got.params, want.params, strict=True)):
        assert _rel(g, w) <= rtol, f"step {step}: params {_rel(g, w):.2e}"
    _close(got.losses, want.losses, rtol, "losses", SCALAR_RTOL64)
    # The same state, entry by entry: counters equal, tensors (0-d ones too) close,
    # Python floats where torch has floats.
    assert _kinds(_state(got)) == _kinds(_state(want))
    _close(_state(got), _state(want), 10 * rtol, scalar_rtol=SCALAR_RTOL64)
    if history_size == 2:
        assert len(_state(want)["old_dirs"]) == 2  # the history was shifted


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_float32_as_close_as_torch(problem: str, line_search: str | None) -> None:
    """float32: both runs are compared with torch's float64 run of the same problem (the
    float32 problem is the float64 one rounded); at every step ferroptim's distance to it
    is at most three times torch's own float32 distance, plus a floor of a few float32
    ulps (the distances measured 1e-6 to 1e-1, ferroptim's within 1.6x of torch's)."""
    kwargs = _kwargs(problem, line_search, 10)
    exact = run(torch.optim.LBFGS, PROBLEMS[problem](torch.float64), STEPS, **kwargs)
    want = run(torch.optim.LBFGS, PROBLEMS[problem](torch.float32), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, PROBLEMS[problem](torch.float32), STEPS, **kwargs)
    for step in range(STEPS):
        ours = _rel(got.params[step], exact.params[step])
        theirs = _rel(want.params[step], exact.params[step])
        assert ours <= 3 * theirs + 1e-5, f"step {step}: {ours:.2e} vs torch's {theirs:.2e}"
        assert got.params[step].dtype == torch.float32
    # (the last step length ``t`` is an int, a float or a 0-d tensor depending on which
    # branch of the line search ended the step: in float32 a last-bit difference, which
    # differs between CPUs' vectorised reductions, can end it in another one)
    assert _kinds({**_state(got), "t": None}) == _kinds({**_state(want), "t": None})


class _TorchDots:
    """ferroptim's Rust entry points with torch's dot products and reductions in place of
    ours (the two-loop recursion through torch's ops, the parameter update still Rust)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(ferroptim._core, name)

    @staticmethod
    def lbfgs_dot(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a.dot(b))

    @staticmethod
    def lbfgs_dot_pair(y: torch.Tensor, s: torch.Tensor) -> tuple[float, float]:
        return float(y.dot(s)), float(y.dot(y))

    @staticmethod
    def lbfgs_abs(x: torch.Tensor, with_sum: bool = False) -> tuple[float, float]:
        return float(x.abs().max()), float(x.abs().sum())

    @staticmethod
    def lbfgs_direction(*args: Any) -> Any:
        raise ValueError("use torch's two-loop recursion")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_bitwise_with_torchs_dot_products(
    monkeypatch: pytest.MonkeyPatch, problem: str, line_search: str | None, dtype: torch.dtype
) -> None:
    """Given torch's dot products, every other number is torch's bit for bit: the scalar
    roundings, the line search, the exits, the types in the state, and the Rust parameter
    update (one fused multiply-add, as torch's ``add_(alpha=)``)."""
    monkeypatch.setattr(ferro_lbfgs, "_core", _TorchDots())
    calls = []
    real_add = ferroptim._core.lbfgs_add
    monkeypatch.setattr(
        _TorchDots,
        "lbfgs_add",
        staticmethod(lambda *a: calls.append(1) or real_add(*a)),
        raising=False,
    )
    kwargs = _kwargs(problem, line_search, 3)
    want = run(torch.optim.LBFGS, PROBLEMS[problem](dtype), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, PROBLEMS[problem](dtype), STEPS, **kwargs)
    assert calls, "the parameter update did not run in Rust"
    for g, w in zip(got.params, want.params, strict=True):
        assert torch.equal(g, w)
    assert got.losses == want.losses
    assert _kinds(_state(got)) == _kinds(_state(want))
    _close(_state(got), _state(want), 0.0)


# Each of torch's exits from the iteration loop (one step call, least squares with its
# loss scaled by ``scale``): the arguments that lead there, and what in torch's state
# proves the exit was taken. Without a line search every move but the last iteration's
# costs one evaluation, so ``func_evals == n_iter + 1`` says the loop ended after a move
# (the exits at the end of an iteration), ``func_evals == n_iter`` before one.
EXITS: dict[str, tuple[float, dict[str, Any], Any]] = {
    # optimal at the first evaluation: nothing but the closure ran
    "optimal_at_start": (
        1.0,
        {"tolerance_grad": 1e6},
        lambda s, p: s["func_evals"] == 1 and s["n_iter"] == 0 and "d" not in s,
    ),
    # directional derivative above -tolerance_change: stops before the first move
    "gtd": (
        1.0,
        {"tolerance_change": 1e6},
        lambda s, p: s["n_iter"] == 1 and s["func_evals"] == 1,
    ),
    "max_iter": (
        1.0,
        {"max_iter": 3, "max_eval": 100, "lr": 0.1},
        lambda s, p: s["n_iter"] == 3 and s["func_evals"] == 3,
    ),
    # the line search spends the evaluations: max_eval stops the loop first
    "max_eval": (
        1.0,
        {"max_iter": 100, "max_eval": 7, "line_search_fn": "strong_wolfe"},
        lambda s, p: s["func_evals"] >= 7 and s["n_iter"] < 100,
    ),
    # first-order optimality after a move: the gradient at the final point is small
    "opt_cond": (
        1.0,
        {"max_iter": 200, "max_eval": 400, "tolerance_grad": 1e-3},
        lambda s, p: (
            1 < s["n_iter"] < 200 and s["func_evals"] == s["n_iter"] + 1 and _grad_max(p) <= 1e-3
        ),
    ),
    # lack of progress: |d * t| below tolerance_change (a steep loss: its changes stay
    # above the tolerance while the steps fall below it)
    "small_step": (
        1e3,
        {"max_iter": 200, "max_eval": 400, "tolerance_change": 1e-3, "tolerance_grad": 0.0},
        lambda s, p: (
            1 < s["n_iter"] < 200
            and s["func_evals"] == s["n_iter"] + 1
            and float((s["d"] * s["t"]).abs().max()) <= 1e-3
        ),
    ),
    # |loss - prev_loss| < tolerance_change: near the minimum the loss changes with the
    # square of the step, so it falls below the tolerance first
    "loss_change": (
        1.0,
        {"max_iter": 200, "max_eval": 400, "tolerance_change": 1e-4, "tolerance_grad": 0.0},
        lambda s, p: (
            1 < s["n_iter"] < 200
            and s["func_evals"] == s["n_iter"] + 1
            and float((s["d"] * s["t"]).abs().max()) > 1e-4
        ),
    ),
}


def _grad_max(problem: Problem) -> float:
    for p in problem.params:
        p.grad = None
    problem.loss().backward()
    return max(float(p.grad.abs().max()) for p in problem.params)


def _scaled(dtype: torch.dtype, scale: float) -> Problem:
    problem = least_squares(dtype)
    return Problem(problem.params, lambda: problem.loss() * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("exit_name", list(EXITS))
def test_exit_branches(exit_name: str, dtype: torch.dtype) -> None:
    scale, extra, taken = EXITS[exit_name]
    kwargs = {"lr": 1, "max_iter": 20, "history_size": 10, **extra}
    want = run(torch.optim.LBFGS, _scaled(dtype, scale), 1, **kwargs)
    got = run(ferroptim.LBFGS, _scaled(dtype, scale), 1, **kwargs)
    assert taken(_state(want), want.problem), f"torch did not take the {exit_name} exit"
    assert taken(_state(got), got.problem), f"ferroptim did not take the {exit_name} exit"
    if dtype == torch.float64:
        for key in ("n_iter", "func_evals"):
            assert _state(got)[key] == _state(want)[key]
        assert _rel(got.params[-1], want.params[-1]) <= 1e-10


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
@pytest.mark.parametrize("direction", ["torch_to_ferroptim", "ferroptim_to_torch"])
def test_state_dict_interop(direction: str, line_search: str | None) -> None:
    """A checkpoint taken mid-training (through torch.save) loads into the other class
    and training continues to torch's numbers."""
    first, second = (
        (torch.optim.LBFGS, ferroptim.LBFGS)
        if direction == "torch_to_ferroptim"
        else (ferroptim.LBFGS, torch.optim.LBFGS)
    )
    kwargs = _kwargs("mlp", line_search, 5)
    reference = run(torch.optim.LBFGS, mlp(torch.float64), 2 * STEPS, **kwargs)

    trained = run(first, mlp(torch.float64), STEPS, **kwargs)
    buffer = io.BytesIO()
    torch.save(trained.optimizer.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert structure(saved) == structure(trained.optimizer.state_dict())

    problem = mlp(torch.float64)
    with torch.no_grad():
        for p, q in zip(problem.params, trained.problem.params, strict=True):
            p.copy_(q)
    resumed_opt = second(problem.params, **kwargs)
    resumed_opt.load_state_dict(saved)
    resumed = run(second, problem, STEPS, optimizer=resumed_opt)
    # (float64, a last-bit difference in a dot product amplified over the MLP's steps:
    # within 1e-10 on an Intel Xeon, 9.6e-10 measured on an AMD EPYC, whose torch
    # reductions vectorise differently)
    for step in range(STEPS):
        assert _rel(resumed.params[step], reference.params[STEPS + step]) <= 1e-8
    _close(_state(resumed), _state(reference), 1e-7, scalar_rtol=SCALAR_RTOL64)


def test_params_without_grad_and_many_steps() -> None:
    """A parameter the loss never reads has no grad (torch's flat gradient holds zeros
    for it): it stays put, the others match torch's over many step calls."""

    def with_unused(dtype: torch.dtype) -> Problem:
        problem = mlp(dtype)
        unused = torch.nn.Parameter(torch.ones(7, dtype=dtype))
        return Problem([problem.params[0], unused, *problem.params[1:]], problem.loss)

    kwargs = _kwargs("mlp", "strong_wolfe", 10)
    want = run(torch.optim.LBFGS, with_unused(torch.float64), 12, **kwargs)
    got = run(ferroptim.LBFGS, with_unused(torch.float64), 12, **kwargs)
    assert got.problem.params[1].grad is None
    assert torch.equal(got.problem.params[1], torch.ones(7, dtype=torch.float64))
    for g, w in zip(got.params, want.params, strict=True):
        assert _rel(g, w) <= 1e-10


def test_non_contiguous_params() -> None:
    """A strided parameter (every other element of a buffer): Rust refuses to update it
    as one run of memory, torch's update runs instead, and the numbers stay torch's. A
    transposed one fails in torch's own gradient gathering (``view`` of its transposed
    gradient): the same error, and nothing written."""

    def strided(dtype: torch.dtype) -> Problem:
        problem = least_squares(dtype)
        w, bias = problem.params
        wide = torch.zeros(26, dtype=dtype)
        wide[::2] = bias.detach()
        bias_s = torch.nn.Parameter(wide[::2])
        assert not bias_s.is_contiguous()
        design, target = _design(dtype), _target(dtype)

        def loss() -> torch.Tensor:
            return ((design @ w.t() + bias_s - target) ** 2).mean()

        return Problem([w, bias_s], loss)

    kwargs = _kwargs("least_squares", "strong_wolfe", 5)
    want = run(torch.optim.LBFGS, strided(torch.float64), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, strided(torch.float64), STEPS, **kwargs)
    for g, w in zip(got.params, want.params, strict=True):
        assert _rel(g, w) <= 1e-10
    assert not got.problem.params[1].is_contiguous()

    errors = []
    for cls in (torch.optim.LBFGS, ferroptim.LBFGS):
        problem = least_squares(torch.float64)
        w_t = torch.nn.Parameter(problem.params[0].detach().t().contiguous().t())
        before = w_t.detach().clone()
        transposed = Problem([w_t], lambda w_t=w_t: (w_t**2).sum())
        with pytest.raises(RuntimeError) as info:
            run(cls, transposed, 1)
        errors.append(str(info.value))
        assert torch.equal(w_t, before)
    assert errors[0] == errors[1]


def _design(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(200, 37, generator=gen, dtype=torch.float64).to(dtype)


def _target(dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    torch.randn(200, 37, generator=gen, dtype=torch.float64)
    return torch.randn(200, 13, generator=gen, dtype=torch.float64).to(dtype)


def test_param_replaced_between_steps() -> None:
    """``p.data`` swapped for a new tensor between steps: the same size continues as
    torch does; another size fails with torch's error in both, before any write."""
    kwargs = _kwargs("least_squares", None, 5)
    trajs = []
    for cls in (torch.optim.LBFGS, ferroptim.LBFGS):
        problem = least_squares(torch.float64)
        traj = run(cls, problem, 2, **kwargs)
        problem.params[0].data = problem.params[0].detach().clone() * 0.5
        trajs.append(run(cls, problem, 2, optimizer=traj.optimizer))
    assert _rel(trajs[1].params[-1], trajs[0].params[-1]) <= 1e-10

    errors = []
    for traj in trajs:
        w, bias = traj.problem.params
        bias.data = torch.zeros(5, dtype=torch.float64)
        before = w.detach().clone()

        def closure(traj: Trajectory = traj, w: torch.Tensor = w) -> torch.Tensor:
            traj.optimizer.zero_grad()
            loss = (w**2).sum() + (traj.problem.params[1] ** 2).sum()
            loss.backward()
            return loss

        with pytest.raises(RuntimeError) as info:
            traj.optimizer.step(closure)
        errors.append(str(info.value))
        assert torch.equal(w, before)
    assert errors[0] == errors[1]


def _big_least_squares(dtype: torch.dtype) -> Problem:
    # 13 x 12_000 weights: several 64K-element chunks, so the pool splits every pass.
    return least_squares(dtype, rows=40, cols=12_000)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bitwise_across_threads_and_simd_levels(dtype: torch.dtype, simd_levels: list[str]) -> None:
    kwargs = {"lr": 1, "history_size": 4, "line_search_fn": "strong_wolfe", "max_iter": 6}

    def trajectory() -> Trajectory:
        return run(ferroptim.LBFGS, _big_least_squares(dtype), 2, **kwargs)

    ferroptim.set_num_threads(1)
    want = trajectory()
    configs: list[tuple[int, str | None]] = [(t, None) for t in (2, 3)]
    configs += [(2, level) for level in simd_levels]
    for threads, level in configs:
        ferroptim.set_num_threads(min(threads, ferroptim.max_num_threads()))
        ferroptim.set_simd_level(level)
        got = trajectory()
        for g, w in zip(got.params, want.params, strict=True):
            assert torch.equal(g, w), f"{threads} threads, level {level}"
        assert got.losses == want.losses
        _close(_state(got), _state(want), 0.0)


def _no_rust(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a Rust entry point ran on torch's path")

    for name in dir(ferroptim._core):
        if name.startswith("lbfgs_"):
            monkeypatch.setattr(ferroptim._core, name, refuse)


@pytest.mark.parametrize("line_search", LINE_SEARCHES)
def test_torch_backend_is_torchs_implementation(
    monkeypatch: pytest.MonkeyPatch, line_search: str | None
) -> None:
    ferroptim.set_backend("torch")
    _no_rust(monkeypatch)
    kwargs = _kwargs("mlp", line_search, 5)
    want = run(torch.optim.LBFGS, mlp(torch.float32), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, mlp(torch.float32), STEPS, **kwargs)
    for g, w in zip(got.params, want.params, strict=True):
        assert torch.equal(g, w)


def test_other_dtypes_take_torchs_path(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_rust(monkeypatch)
    for dtype in (torch.bfloat16, torch.complex64):
        p = torch.nn.Parameter(torch.ones(5, dtype=dtype))
        q = torch.nn.Parameter(torch.ones(5, dtype=dtype))
        for param, cls in ((p, torch.optim.LBFGS), (q, ferroptim.LBFGS)):
            opt = cls([param], lr=0.1, max_iter=3)

            def closure(param: torch.Tensor = param, opt: Any = opt) -> torch.Tensor:
                opt.zero_grad()
                loss = (param.abs() ** 2).sum()
                loss.backward()
                return loss

            opt.step(closure)
        assert torch.equal(p, q)


def test_maximize_and_tensor_lr() -> None:
    def negated(dtype: torch.dtype) -> Problem:
        problem = least_squares(dtype)
        return Problem(problem.params, lambda: -problem.loss())

    kwargs = {"lr": torch.tensor(0.5), "maximize": True, "history_size": 5, "max_iter": 10}
    want = run(torch.optim.LBFGS, negated(torch.float64), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, negated(torch.float64), STEPS, **kwargs)
    for g, w in zip(got.params, want.params, strict=True):
        assert _rel(g, w) <= 1e-10
    assert want.losses[-1] > want.losses[0]  # it did climb


def test_step_hooks_run_once() -> None:
    problem = least_squares(torch.float64)
    opt = ferroptim.LBFGS(problem.params, max_iter=2)
    seen: list[str] = []
    opt.register_step_pre_hook(lambda *a: seen.append("pre"))
    opt.register_step_post_hook(lambda *a: seen.append("post"))
    torch.optim.LBFGS(least_squares(torch.float64).params)  # torch wraps its own step
    run(ferroptim.LBFGS, problem, 2, optimizer=opt)
    assert seen == ["pre", "post", "pre", "post"]


def _history_tensors(state: dict[str, Any]) -> Iterator[torch.Tensor]:
    yield from state["old_dirs"]
    yield from state["old_stps"]


def test_history_not_aliased() -> None:
    """Each history vector is its own tensor, as torch's (a checkpoint holds them
    independently; nothing of ours is shared between them)."""
    got = run(ferroptim.LBFGS, mlp(torch.float64), 2, **_kwargs("mlp", None, 5))
    pointers = [t.data_ptr() for t in _history_tensors(_state(got))]
    assert len(set(pointers)) == len(pointers) == 10
    assert copy.deepcopy(got.optimizer.state_dict())["state"][0]["n_iter"] == 30


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("line_search", LINE_SEARCHES)
def test_cuda_params_take_torchs_path(
    monkeypatch: pytest.MonkeyPatch, line_search: str | None
) -> None:
    """CUDA parameters step through torch's own implementation: torch's numbers exactly."""
    _no_rust(monkeypatch)
    kwargs = _kwargs("least_squares", line_search, 5)
    want = run(torch.optim.LBFGS, _cuda_least_squares(), STEPS, **kwargs)
    got = run(ferroptim.LBFGS, _cuda_least_squares(), STEPS, **kwargs)
    for g, w in zip(got.params, want.params, strict=True):
        assert g.is_cuda and torch.equal(g, w)


def _cuda_least_squares() -> Problem:
    w, bias = (torch.nn.Parameter(p.detach().cuda()) for p in least_squares(torch.float32).params)
    design, target = _design(torch.float32).cuda(), _target(torch.float32).cuda()
    return Problem([w, bias], lambda: ((design @ w.t() + bias - target) ** 2).mean())


def test_step_bumps_the_autograd_version_counter() -> None:
    """As torch's in-place ``add_``: a graph that saved a parameter before ``step`` refuses
    to backprop through it afterwards."""
    for cls in (torch.optim.LBFGS, ferroptim.LBFGS):
        problem = least_squares(torch.float64)
        opt = cls(problem.params, max_iter=2)
        saved = (problem.params[0] ** 2).sum()  # saves the parameter for backward
        version = problem.params[0]._version
        run(cls, problem, 1, optimizer=opt)
        assert problem.params[0]._version > version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            saved.backward()
