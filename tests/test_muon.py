"""ferroptim.Muon against torch.optim.Muon: what the registry's generic tests do not
cover for an optimizer of 2-D matrices (its entry in ``optim_db`` marks which of them
apply).

Every comparison is bitwise: the momentum pass (Rust) reproduces torch's ``lerp``
roundings, and the Newton–Schulz products and the param update are torch's own ops on
the same bfloat16 tensors in the same layouts. Trajectories run many steps, so an
ulp of difference in the momentum would be amplified through Newton–Schulz (bfloat16
rounding makes such differences visible at once) and fail the comparison.
"""

from __future__ import annotations

import copy
import inspect
import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from _kernels import kernel_calls
from conftest import ferroptim, randn64
from optim_db import MATRIX_FAMILIES

#: Square, wide and tall (transposed inside Newton–Schulz), ragged SIMD tails, a
#: parallel-chunked one, single rows and columns.
#: Square, wide and tall (Newton–Schulz transposes tall matrices), vectors as matrices, and
#: one of more than the engine's 64K-element chunk (thin: its matrix products stay cheap).
SHAPES = ((64, 64), (33, 65), (65, 33), (96, 300), (300, 96), (1, 17), (17, 1), (19, 3851))

Make = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def _params(
    dtype: torch.dtype = torch.float32, shapes: tuple[tuple[int, int], ...] = SHAPES
) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in shapes
    ]


def _grads(
    params: list[torch.nn.Parameter], gen: torch.Generator, k: int, layout: str
) -> list[torch.Tensor | None]:
    out: list[torch.Tensor | None] = []
    for i, p in enumerate(params):
        if (i + k) % 5 == 0:
            out.append(None)  # some params miss their gradient on some steps
            continue
        if layout == "transposed":  # a column-major gradient (the buffer copies its strides)
            g = randn64(p.shape[::-1], gen).to(p.dtype).t()
        else:
            g = randn64(p.shape, gen).to(p.dtype)
        out.append(g)
    return out


def _run(
    make: Make,
    steps: int,
    dtype: torch.dtype = torch.float32,
    *,
    params: list[torch.nn.Parameter] | None = None,
    opt: torch.optim.Optimizer | None = None,
    seed: int = 1,
    layout: str = "contiguous",
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params(dtype) if params is None else params
    opt = make(params) if opt is None else opt
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for p, g in zip(params, _grads(params, gen, k, layout), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def _assert_bitwise(
    ours: tuple[list[torch.nn.Parameter], torch.optim.Optimizer],
    theirs: tuple[list[torch.nn.Parameter], torch.optim.Optimizer],
) -> None:
    (fp, fo), (tp, to) = ours, theirs
    for i, (a, b) in enumerate(zip(fp, tp, strict=True)):
        assert torch.equal(a, b), f"param {i} {tuple(a.shape)}: {(a - b).abs().max()}"
        sa, sb = fo.state[a], to.state[b]
        assert sa.keys() == sb.keys() == {"momentum_buffer"}
        buf_a, buf_b = sa["momentum_buffer"], sb["momentum_buffer"]
        assert torch.equal(buf_a, buf_b), f"momentum of param {i}"
        assert buf_a.stride() == buf_b.stride()


CASES = {
    "defaults": {},
    "plain_momentum": {"nesterov": False},
    "match_rms_adamw": {"adjust_lr_fn": "match_rms_adamw", "lr": 0.02},
    "spectral_unclamped": {"adjust_lr_fn": "spectral_unclamped", "weight_decay": 0.0},
    "original_explicit": {"adjust_lr_fn": "original", "momentum": 0.5, "nesterov": False},
    "no_momentum": {"momentum": 0.0, "lr": 0.01},
    "low_momentum_nesterov": {"momentum": 0.3, "weight_decay": 0.01},
    "coefficients": {"ns_coefficients": (2.0, -1.5, 0.5), "ns_steps": 3, "eps": 1e-5},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", list(CASES))
def test_many_steps_bitwise_equal_to_torch(case: str, dtype: torch.dtype) -> None:
    kwargs = CASES[case]
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Muon(ps, **kwargs), 60, dtype)
    assert calls["muon_step"] == 60  # every step's momentum ran in Rust
    theirs = _run(lambda ps: torch.optim.Muon(ps, **kwargs), 60, dtype)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("layout", ["transposed"])
def test_column_major_gradients_step_in_rust_bitwise(layout: str) -> None:
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Muon(ps), 20, layout=layout)
    assert calls["muon_step"] == 20
    theirs = _run(lambda ps: torch.optim.Muon(ps), 20, layout=layout)
    _assert_bitwise(ours, theirs)


def test_transposed_params_bitwise() -> None:
    def params() -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(p.detach().t().contiguous().t()) for p in _params()]

    ours = _run(lambda ps: ferroptim.Muon(ps, lr=0.05), 20, params=params())
    theirs = _run(lambda ps: torch.optim.Muon(ps, lr=0.05), 20, params=params())
    _assert_bitwise(ours, theirs)


def test_forced_torch_backend_bitwise() -> None:
    ferroptim.set_backend("torch")
    try:
        with kernel_calls() as calls:
            ours = _run(lambda ps: ferroptim.Muon(ps), 10)
    finally:
        ferroptim.set_backend("auto")
    assert calls["muon_step"] == 0
    _assert_bitwise(ours, _run(lambda ps: torch.optim.Muon(ps), 10))


def test_bfloat16_params_take_torchs_path_bitwise() -> None:
    with kernel_calls() as calls:
        ours = _run(lambda ps: ferroptim.Muon(ps), 10, torch.bfloat16)
    assert calls["muon_step"] == 0
    _assert_bitwise(ours, _run(lambda ps: torch.optim.Muon(ps), 10, torch.bfloat16))


def test_groups_and_tensor_lr() -> None:
    def make(cls: type) -> Make:
        def build(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            return cls(
                [
                    {"params": ps[:3]},
                    {"params": ps[3:], "lr": torch.tensor(0.03), "nesterov": False},
                ],
                lr=0.01,
                adjust_lr_fn="match_rms_adamw",
            )

        return build

    _assert_bitwise(_run(make(ferroptim.Muon), 30), _run(make(torch.optim.Muon), 30))


def test_unusual_hyperparameter_types_take_torchs_path() -> None:
    def make(cls: type) -> Make:
        def build(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            return cls(
                [
                    {"params": ps[:4], "momentum": torch.tensor(0.9, dtype=torch.float64)},
                    {"params": ps[4:], "nesterov": 1},
                ]
            )

        return build

    with kernel_calls() as calls:
        ours = _run(make(ferroptim.Muon), 5)
    assert calls["muon_step"] == 0
    _assert_bitwise(ours, _run(make(torch.optim.Muon), 5))


def test_signature_defaults_and_group_keys_are_torchs() -> None:
    assert issubclass(ferroptim.Muon, torch.optim.Muon)
    ours = dict(inspect.signature(ferroptim.Muon.__init__).parameters)
    theirs = inspect.signature(torch.optim.Muon.__init__).parameters
    # (plus ferroptim's keyword-only `ema_decay`)
    assert ours.pop("ema_decay").kind is inspect.Parameter.KEYWORD_ONLY
    assert [(n, p.default) for n, p in ours.items()] == [(n, p.default) for n, p in theirs.items()]
    p = [torch.nn.Parameter(torch.zeros(3, 4))]
    assert ferroptim.Muon(p).param_groups[0].keys() == torch.optim.Muon(p).param_groups[0].keys()
    assert ferroptim.Muon(p).defaults == torch.optim.Muon(p).defaults


@pytest.mark.parametrize("direction", ["torch_to_ferro", "ferro_to_torch"])
def test_checkpoint_interchange_mid_training(direction: str) -> None:
    first, second = (
        (torch.optim.Muon, ferroptim.Muon)
        if direction == "torch_to_ferro"
        else (ferroptim.Muon, torch.optim.Muon)
    )
    kwargs: dict[str, Any] = {"lr": 0.02, "adjust_lr_fn": "match_rms_adamw"}
    params, opt = _run(lambda ps: first(ps, **kwargs), 15)
    saved = copy.deepcopy(opt.state_dict())
    reference_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = first(reference_params, **kwargs)
    reference.load_state_dict(copy.deepcopy(saved))
    resumed = second([torch.nn.Parameter(p.detach().clone()) for p in params], **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    ours = _run(lambda ps: resumed, 15, params=list(resumed.param_groups[0]["params"]), seed=7)
    theirs = _run(lambda ps: reference, 15, params=reference_params, seed=7)
    _assert_bitwise(ours, theirs)


def test_non_2d_params_raise_torchs_error() -> None:
    for shape in [(3,), (2, 3, 4)]:
        with pytest.raises(ValueError, match="Muon only supports 2D parameters"):
            ferroptim.Muon([torch.nn.Parameter(torch.zeros(shape))])


def _two_groups() -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params()
    opt = ferroptim.Muon([{"params": params[:4]}, {"params": params[4:]}])
    _run(lambda ps: opt, 3, params=params)
    return params, opt


def _snapshot(params: list[torch.nn.Parameter], opt: torch.optim.Optimizer) -> list[Any]:
    return [p.detach().clone() for p in params] + [
        {k: v.clone() for k, v in opt.state[p].items()} for p in params
    ]


def _assert_unchanged(before: list[Any], after: list[Any]) -> None:
    for a, b in zip(before, after, strict=True):
        if isinstance(a, dict):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        else:
            assert torch.equal(a, b)


def _complex_param() -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.complex64))
    param.grad = torch.ones_like(param)
    return param


BAD: dict[str, tuple[Callable[[list[torch.nn.Parameter], torch.optim.Optimizer], None], Any]] = {
    "ns_steps": (
        lambda ps, opt: opt.param_groups[1].update(ns_steps=100),
        (ValueError, "Number of steps must be less than 100"),
    ),
    "coefficients": (
        lambda ps, opt: opt.param_groups[1].update(ns_coefficients=(1.0, 2.0)),
        (ValueError, "exactly 3 values"),
    ),
    "complex_param": (
        lambda ps, opt: opt.param_groups[1]["params"].append(_complex_param()),
        (RuntimeError, "complex"),
    ),
    "sparse_grad": (
        lambda ps, opt: setattr(ps[-1], "grad", torch.zeros(ps[-1].shape).to_sparse()),
        (RuntimeError, "sparse"),
    ),
    "grad_1d": (
        lambda ps, opt: setattr(ps[-1].grad, "data", torch.zeros(ps[-1].numel())),
        (ValueError, "2D matrix"),
    ),
    "grad_wrong_shape": (
        lambda ps, opt: setattr(ps[-1].grad, "data", torch.zeros(ps[-1].shape[::-1]).t().t()[:1]),
        (RuntimeError, "size"),
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_before_any_write(case: str) -> None:
    params, opt = _two_groups()
    gen = torch.Generator().manual_seed(3)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    spoil, (error, words) = BAD[case]
    spoil(params, opt)
    before = _snapshot(params, opt)
    with pytest.raises(error, match=words):
        opt.step()
    _assert_unchanged(before, _snapshot(params, opt))


def test_failed_first_step_creates_no_state() -> None:
    params = _params()
    opt = ferroptim.Muon([{"params": params[:4]}, {"params": params[4:], "ns_steps": 100}])
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="less than 100"):
        opt.step()
    assert not opt.state
    assert all(torch.equal(p, q) for p, q in zip(params, _params(), strict=True))


def test_closure_and_hooks() -> None:
    params = _params()
    opt = ferroptim.Muon(params)
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and seen == ["pre", "post"]
    assert all("momentum_buffer" in opt.state[p] for p in params)


# -- the registry entry's flag grid ------------------------------------------------------

FAMILY = MATRIX_FAMILIES["Muon"]
GRID = [
    dict(zip(FAMILY.grid, values, strict=True))
    for values in itertools.product(*FAMILY.grid.values())
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("flags", GRID, ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()))
def test_flag_grid_bitwise_with_two_groups(flags: dict[str, Any], dtype: torch.dtype) -> None:
    def make(cls: type) -> Make:
        def build(ps: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
            second = {**FAMILY.second_group, "params": ps[4:]}
            return cls([{"params": ps[:4]}, second], **{**FAMILY.train_kwargs, **flags})

        return build

    with kernel_calls() as calls:
        ours = _run(make(FAMILY.ferro), 20, dtype)
    assert calls[FAMILY.kernel] == 2 * 20  # one Rust pass per group and step
    _assert_bitwise(ours, _run(make(FAMILY.torch), 20, dtype))


# -- end to end: a bias-free MLP (Muon's params are 2-D) ----------------------------------


def _mlp(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(48, 96, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(96, 33, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(33, 8, bias=False),
    ).to(device)


def _data(device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(16, 48, generator=gen).to(device),
            torch.randn(16, 8, generator=gen).to(device),
        )
        for _ in range(8)
    ]


def _train_amp(cls: type, init_scale: float) -> tuple[torch.nn.Module, list[float]]:
    model = _mlp()
    opt = cls(model.parameters(), **FAMILY.train_kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=2)
    scales = []
    for x, y in _data():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return model, scales


@pytest.mark.parametrize("init_scale", [2.0**10, 2.0**127], ids=["finite", "overflow_first"])
def test_grad_scaler_training_bitwise(init_scale: float) -> None:
    # torch's Muon has no `_step_supports_amp_scaling`: GradScaler unscales the gradients
    # and skips inf/nan steps itself, for both; a huge first scale overflows (skipped).
    assert not getattr(
        ferroptim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]), "_step_supports_amp_scaling", False
    )
    ours, our_scales = _train_amp(ferroptim.Muon, init_scale)
    theirs, their_scales = _train_amp(torch.optim.Muon, init_scale)
    assert our_scales == their_scales
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


def _train_compiled(cls: type) -> torch.nn.Module:
    model = _mlp()
    compiled = torch.compile(model, backend="aot_eager")
    opt = cls(model.parameters(), **FAMILY.train_kwargs)

    @torch.compile(backend="eager")
    def step() -> None:
        opt.step()

    for x, y in _data():
        opt.zero_grad()
        torch.nn.functional.mse_loss(compiled(x), y).backward()
        step()
    return model


def test_compiled_model_and_step_bitwise() -> None:
    ours, theirs = _train_compiled(ferroptim.Muon), _train_compiled(torch.optim.Muon)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_params_take_torchs_implementation() -> None:
    def train(cls: type) -> torch.nn.Module:
        model = _mlp(device="cuda")
        opt = cls(model.parameters(), **FAMILY.train_kwargs)
        for x, y in _data("cuda"):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return model

    with kernel_calls() as calls:
        ours = train(ferroptim.Muon)
    assert calls[FAMILY.kernel] == 0
    for a, b in zip(ours.parameters(), train(torch.optim.Muon).parameters(), strict=True):
        assert a.device.type == "cuda" and torch.equal(a, b)
