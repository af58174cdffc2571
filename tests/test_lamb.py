"""ferroptim.LAMB against the real ``pytorch_optimizer.Lamb`` (pytorch-optimizer 4.1.0),
side by side over hundreds of steps.

Two ops of the reference's default (foreach) flavour are not correctly rounded on every
CPU: ``torch._foreach_sqrt`` (torch's vectorised sqrt, an ulp off on some inputs) and
``torch._foreach_norm`` (float32 accumulation). Ours are correctly rounded (the norms are
float64 sums in a fixed tree, rounded to the tensor's dtype). So the bitwise comparisons
run the reference with those two ops correctly rounded (``exact_ops``,
``_pytorch_optimizer_reference.exact_norms_and_sqrt``); against the
unpatched reference, trajectories agree to a tolerance that last-bit differences of the
trust ratios and square roots explain (each changes an update by a relative 2^-23 or
so; over 100 steps of lr 1e-3 on params of size ~1 that stays far below 1e-5).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import pytest
import pytorch_optimizer
import torch
from _kernels import kernel_calls
from _pytorch_optimizer_reference import exact_norms_and_sqrt as exact_ops
from conftest import ferroptim, randn64
from pytorch_optimizer.base.exception import NoSparseGradientError

#: Ragged sizes wider than any SIMD width (tails of 1..15), a parallel-chunked tensor
#: (several chunks of the engine's plan), a scalar-like one, an all-zero one (trust ratio
#: 1).
SHAPES = ((1,), (15,), (17, 3), (257,), (130_001,), (8, 33), (300, 257), (5, 7))

Make = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

#: Every flag of the Rust path (its default flavour).
CONFIGS = [
    pytest.param({}, id="defaults"),
    pytest.param({"lr": 1e-2, "weight_decay": 0.1}, id="decoupled"),
    pytest.param(
        {"lr": 3e-3, "weight_decay": 0.05, "weight_decouple": False, "betas": (0.8, 0.99)},
        id="coupled",
    ),
    pytest.param(
        {"weight_decay": 0.01, "fixed_decay": True, "grad_averaging": False}, id="fixed-decay"
    ),
    pytest.param({"maximize": True, "adam": True, "eps": 1e-3}, id="maximize-adam"),
    pytest.param({"pre_norm": True, "max_grad_norm": 0.5, "weight_decay": 0.1}, id="pre-norm"),
    pytest.param({"adam_debias": True, "lr": 5e-3}, id="adam-debias"),
    pytest.param(
        {"maximize": True, "weight_decay": 0.1, "weight_decouple": False, "adam": True},
        id="maximize-coupled-adam",
    ),
]

#: The reference's per-parameter flavour (ferroptim's torch-op code steps these).
PER_PARAM_CONFIGS = [
    pytest.param({"foreach": False, "weight_decay": 0.1}, id="foreach-false"),
    pytest.param({"rectify": True, "lr": 1e-2}, id="rectify"),
    pytest.param(
        {"rectify": True, "degenerated_to_sgd": True, "n_sma_threshold": 4}, id="rect-sgd"
    ),
    pytest.param({"adanorm": True, "adanorm_r": 0.9, "maximize": True}, id="adanorm"),
    pytest.param({"foreach": False, "pre_norm": True, "weight_decouple": False}, id="pn-loop"),
]


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
        for s in SHAPES
    ]
    with torch.no_grad():
        params[-1].zero_()
    return params


def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
    return [
        {"params": params[:4]},
        {"params": params[4:], "lr": 7e-4, "betas": (0.5, 0.9)},
    ]


def _run(
    make: Make,
    steps: int,
    dtype: torch.dtype = torch.float32,
    params: list[torch.nn.Parameter] | None = None,
    opt: torch.optim.Optimizer | None = None,
    seed: int = 1,
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params(dtype) if params is None else params
    opt = make(params) if opt is None else opt
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        for i, p in enumerate(params):
            scale = 10.0 ** ((k % 7) - 4)  # gradients of many magnitudes
            g = (randn64(p.shape, gen) * scale).to(p.dtype)
            # Some params miss their gradient on some steps (no update, no decay).
            p.grad = None if (i + k) % 5 == 0 else g
        opt.step()
    return params, opt


def _assert_bitwise(
    ours: tuple[list[torch.Tensor], torch.optim.Optimizer],
    theirs: tuple[list[torch.Tensor], torch.optim.Optimizer],
    float64_norms_differ: bool = False,
) -> None:
    """The same bits in params, state and step counters; with ``float64_norms_differ``,
    float64 params (whose norms no sum order rounds correctly: see
    ``test_float64_matches_the_reference``) to a relative 1e-12."""
    (fp, fo), (tp, to) = ours, theirs
    for a, b in zip(fp, tp, strict=True):
        if float64_norms_differ and a.dtype == torch.float64:
            torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
            continue
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=0, equal_nan=True)
        assert set(fo.state[a]) == set(to.state[b])
        for key, theirs_value in to.state[b].items():
            ours_value = fo.state[a][key]
            if isinstance(theirs_value, float):  # (the per-param flavour's trust ratio 1.0)
                assert float(ours_value) == theirs_value, key
                continue
            assert isinstance(ours_value, torch.Tensor), key
            assert ours_value.dtype == theirs_value.dtype, key
            torch.testing.assert_close(ours_value, theirs_value, rtol=0, atol=0, equal_nan=True)
    assert [g["step"] for g in fo.param_groups] == [g["step"] for g in to.param_groups]


def _ours(kwargs: dict[str, Any]) -> Make:
    return lambda ps: ferroptim.LAMB(_groups(ps), **kwargs)


def _theirs(kwargs: dict[str, Any]) -> Make:
    return lambda ps: pytorch_optimizer.Lamb(_groups(ps), **kwargs)


def test_signature_is_the_references_plus_keywords():
    ours = inspect.signature(ferroptim.LAMB.__init__).parameters
    theirs = inspect.signature(pytorch_optimizer.Lamb.__init__).parameters
    positional = [n for n, p in theirs.items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    assert list(ours)[: len(positional)] == positional
    for name in positional:
        assert ours[name].kind == theirs[name].kind, name
        assert ours[name].default == theirs[name].default, name
    extra = [p for name, p in ours.items() if name not in theirs]
    assert {p.name for p in extra} >= {"differentiable", "skip_nonfinite"}
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra)
    assert ferroptim.Lamb is ferroptim.LAMB
    assert str(ferroptim.LAMB(_params())) == "Lamb"


def test_group_keys_are_the_references_plus_torch_conventions():
    f = ferroptim.LAMB(_params(), weight_decay=0.1, adanorm=True)
    t = pytorch_optimizer.Lamb(_params(), weight_decay=0.1, adanorm=True)
    ours, theirs = f.param_groups[0], t.param_groups[0]
    assert set(ours) == set(theirs) | {"maximize", "differentiable"}
    assert {k: ours[k] for k in theirs if k != "params"} == {
        k: v for k, v in theirs.items() if k != "params"
    }
    assert isinstance(f, torch.optim.Optimizer)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_bitwise_equal_to_the_reference(kwargs):
    """float32: the reference's default flavour in its order, rounded alike: the same bits
    (params, moments, norms, trust ratios) over 300 steps and two groups, with its norms
    and square roots correctly rounded."""
    # (both sides patched: ``pre_norm``'s global norm is the reference's own
    # ``_foreach_norm`` on ours too)
    with exact_ops():
        with kernel_calls() as calls:
            ours = _run(_ours(kwargs), 300)
        theirs = _run(_theirs(kwargs), 300)
    assert calls["lamb_step"] > 0
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_float64_matches_the_reference(kwargs):
    """float64: every op but the norms is correctly rounded on both sides, and no float64
    sum order gives correctly rounded float64 norms; ours (a fixed tree) and torch's
    (its own order) differ by an ulp or so, so each trust ratio by a relative ~1e-16 and
    the params, over 300 steps, by far less than 1e-12."""
    with kernel_calls() as calls:
        ours = _run(_ours(kwargs), 300, torch.float64)
    assert calls["lamb_step"] > 0
    theirs = _run(_theirs(kwargs), 300, torch.float64)
    (fp, fo), (tp, to) = ours, theirs
    for a, b in zip(fp, tp, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)
        assert set(fo.state[a]) == set(to.state[b])
        for key, value in to.state[b].items():
            assert fo.state[a][key].dtype == torch.float64
            torch.testing.assert_close(fo.state[a][key], value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_close_to_the_references_default_flavour_as_it_is(kwargs):
    """Against the unpatched reference (see the module docs for the tolerance)."""
    ours = _run(_ours(kwargs), 100)
    theirs = _run(_theirs(kwargs), 100)
    for a, b in zip(ours[0], theirs[0], strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(ours[0], theirs[0], strict=True):
        ratio_a = ours[1].state[a].get("trust_ratio")
        ratio_b = theirs[1].state[b].get("trust_ratio")
        if ratio_b is not None:
            torch.testing.assert_close(ratio_a, ratio_b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kwargs", [*CONFIGS, *PER_PARAM_CONFIGS])
def test_torch_path_bitwise_equal_to_the_reference(kwargs):
    """ferroptim's torch-op code (other devices, the backend forced to torch): the
    reference's ops, so the same bits with nothing patched."""
    ferroptim.set_backend("torch")
    with kernel_calls() as calls:
        ours = _run(_ours(kwargs), 60)
    assert not calls
    theirs = _run(_theirs(kwargs), 60)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kwargs", PER_PARAM_CONFIGS)
def test_per_parameter_flavour_steps_like_the_reference(kwargs, dtype):
    """``rectify``, ``adanorm``, ``foreach=False``: the reference's per-parameter update
    (it divides where the default multiplies by a reciprocal), stepped with torch ops."""
    with kernel_calls() as calls:
        ours = _run(_ours(kwargs), 120, dtype)
    assert not calls
    theirs = _run(_theirs(kwargs), 120, dtype)
    _assert_bitwise(ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_params_step_like_the_reference(dtype):
    kwargs = {"lr": 1e-2, "weight_decay": 0.1, "eps": 1e-3}
    with kernel_calls() as calls:
        ours = _run(_ours(kwargs), 30, dtype)
    assert not calls
    theirs = _run(_theirs(kwargs), 30, dtype)
    _assert_bitwise(ours, theirs)


def test_mixed_float32_float64_group():
    """One group of float32 and float64 params: one Rust plan; the reference steps each
    dtype apart. Norms are kept in each param's dtype."""

    def mixed() -> list[torch.nn.Parameter]:
        ps = _params()
        return [p if i % 2 else torch.nn.Parameter(p.detach().double()) for i, p in enumerate(ps)]

    kwargs = {"weight_decay": 0.1, "lr": 1e-2}
    with kernel_calls() as calls:
        ours = _run(_ours(kwargs), 50, params=mixed())
    assert calls["lamb_step"] > 0
    with exact_ops():
        theirs = _run(_theirs(kwargs), 50, params=mixed())
    _assert_bitwise(ours, theirs, float64_norms_differ=True)
    assert {ours[1].state[p]["trust_ratio"].dtype for p in ours[0]} == {
        torch.float32,
        torch.float64,
    }


@pytest.mark.parametrize("kwargs", CONFIGS[:3])
def test_one_and_many_threads_and_every_simd_level_are_bitwise_equal(kwargs, simd_levels):
    want = None
    for threads in (1, 2, 3):
        for level in simd_levels:
            ferroptim.set_num_threads(threads)
            ferroptim.set_simd_level(level)
            params, opt = _run(_ours(kwargs), 25)
            got = [p.detach().clone() for p in params] + [
                opt.state[p][k] for p in params for k in ("trust_ratio", "exp_avg_sq")
            ]
            if want is None:
                want = got
            else:
                for a, b in zip(want, got, strict=True):
                    assert torch.equal(a, b), (threads, level)
    ferroptim.set_simd_level(None)


@pytest.mark.parametrize("kwargs", CONFIGS[:5])
@pytest.mark.parametrize("direction", ["reference-to-ferroptim", "ferroptim-to-reference"])
def test_checkpoints_interchange_with_the_reference(kwargs, direction):
    """A state_dict written by one loads into the other (the group's step counter with
    it) and training continues to the same bits as an uninterrupted run of the reference."""
    first, second = (
        (pytorch_optimizer.Lamb, ferroptim.LAMB)
        if direction == "reference-to-ferroptim"
        else (ferroptim.LAMB, pytorch_optimizer.Lamb)
    )
    with exact_ops():
        params, opt = _run(lambda ps: first(_groups(ps), **kwargs), 20)
        saved = copy.deepcopy(opt.state_dict())
        assert set(saved["state"][1]) == {
            "exp_avg",
            "exp_avg_sq",
            "weight_norm",
            "adam_norm",
            "trust_ratio",
        }
        assert [g["step"] for g in saved["param_groups"]] == [20, 20]
        resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
        resumed = second(_groups(resumed_params), **kwargs)
        resumed.load_state_dict(saved)
        resumed_run = _run(lambda ps: resumed, 20, params=resumed_params, opt=resumed, seed=2)

        straight_params, straight = _run(_theirs(kwargs), 20)
        straight_run = _run(lambda ps: straight, 20, params=straight_params, opt=straight, seed=2)
    _assert_bitwise(resumed_run, straight_run)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"lr": -1.0}, r"learning rate must be positive\. \(-1\.0 > 0\)"),
        ({"betas": (1.0, 0.999)}, r"beta1 must be in the range \[0\.0, 1\.0\)"),
        ({"betas": (0.9, -0.1)}, r"beta2 must be in the range \[0\.0, 1\.0\)"),
        ({"weight_decay": -0.1}, "weight_decay must be non-negative"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be non-negative"),
        ({"eps": -1e-8}, "eps must be non-negative"),
    ],
)
def test_constructor_errors_have_the_references_messages(kwargs, words):
    with pytest.raises(Exception, match=words) as theirs:
        pytorch_optimizer.Lamb(_params(), **kwargs)
    with pytest.raises(Exception, match=words) as ours:
        ferroptim.LAMB(_params(), **kwargs)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_sparse_gradient_raises_the_references_error_before_any_write():
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(2)]
    opt = ferroptim.LAMB(params, weight_decay=0.1)
    params[0].grad = torch.randn(8, 4)
    params[1].grad = torch.randn(8, 4).to_sparse()
    before = [p.detach().clone() for p in params]
    with pytest.raises(NoSparseGradientError, match="Lamb does not"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert opt.param_groups[0].get("step", 0) == 0


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda opt, p: setattr(p.grad, "data", torch.randn(3)), id="grad-shape"),
        pytest.param(
            lambda opt, p: setattr(p.grad, "data", torch.ones(8, 4, dtype=torch.int32)),
            id="int-grad",
        ),
        pytest.param(
            lambda opt, p: opt.state[p].__setitem__("exp_avg_sq", torch.zeros(5)),
            id="state-shape",
        ),
    ],
)
def test_bad_gradient_raises_before_any_write(corrupt):
    """An error in any param leaves every param, moment and counter as it was."""
    params = [torch.nn.Parameter(torch.randn(8, 4)) for _ in range(3)]
    opt = ferroptim.LAMB(params, weight_decay=0.1)
    for p in params:
        p.grad = torch.randn(8, 4)
    opt.step()
    before = [p.detach().clone() for p in params]
    moments = [opt.state[p]["exp_avg"].clone() for p in params]
    for p in params:
        p.grad = torch.randn(8, 4)
    corrupt(opt, params[2])
    with pytest.raises((RuntimeError, ValueError, TypeError)):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))
    assert all(
        torch.equal(m, opt.state[p]["exp_avg"]) for m, p in zip(moments, params, strict=True)
    )
    assert opt.param_groups[0]["step"] == 1


def test_the_reference_changes_gradients_and_we_do_not():
    kwargs = {"maximize": True, "pre_norm": True, "max_grad_norm": 0.1}
    for cls, changed in ((pytorch_optimizer.Lamb, True), (ferroptim.LAMB, False)):
        p = torch.nn.Parameter(torch.randn(33, 2))
        p.grad = torch.randn(33, 2)
        grad = p.grad.clone()
        cls([p], **kwargs).step()
        assert (not torch.equal(p.grad, grad)) is changed, cls


def test_noncontiguous_params_step_like_contiguous_ones():
    """A transposed param (and its grad) steps exactly as its contiguous copy."""
    base = torch.randn(40, 30, dtype=torch.float64).float()
    t = torch.nn.Parameter(base.t().contiguous().t())  # column-major storage
    c = torch.nn.Parameter(base.clone())
    ot, oc = ferroptim.LAMB([t], weight_decay=0.1), ferroptim.LAMB([c], weight_decay=0.1)
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        g = torch.randn(40, 30, generator=gen)
        t.grad, c.grad = g.t().contiguous().t(), g.clone()
        ot.step()
        oc.step()
    assert torch.equal(t.detach(), c.detach())
    assert torch.equal(ot.state[t]["trust_ratio"], oc.state[c]["trust_ratio"])


def test_closure_and_lr_scheduler():
    params = _params()
    opt = ferroptim.LAMB(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = sum((p.float() ** 2).sum() for p in params)
        loss.backward()
        return loss

    losses = []
    for _ in range(6):
        losses.append(float(opt.step(closure).detach()))
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
