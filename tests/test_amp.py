"""Mixed-precision loss scaling and non-finite steps.

* ``torch.amp.GradScaler``, two paths, both compared step by step with torch's for-loop
  optimizer under an identical scaler (which unscales in place):

  - default: like torch's default optimizers, ferroptim's do not declare
    ``_step_supports_amp_scaling``, so GradScaler unscales the gradients itself and
    skips non-finite steps without calling ``step`` (what Lightning and accelerate
    expect of a non-fused optimizer);
  - ``fused=True`` (or the attribute set by hand, for RMSprop which has no fused
    option): as torch's fused optimizers, the scaler hands ``step`` its ``grad_scale``
    and ``found_inf``; the kernel unscales as it reads and a step with inf/nan
    gradients is skipped.

  The attribute itself follows torch's through construction, ``load_state_dict``,
  ``copy.deepcopy`` and pickling.
* ``skip_nonfinite=True | "warn"``: ferroptim's own guard against inf/nan gradients.
"""

from __future__ import annotations

import copy
import inspect
import math
import pickle
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from _kernels import kernel_calls
from conftest import CLIPPING, ferroptim, train_cases

pytestmark = pytest.mark.usefixtures("torch_single_threaded")


F32 = {"rtol": 1e-5, "atol": 1e-6}
#: torch's bf16 for-loop rounds after every op; ferroptim's torch path uses its fused
#: kernels (float32 math): a few bf16 ulps apart (as in conftest's TOLERANCES).
BF16 = {"rtol": 3e-2, "atol": 3e-2}

#: (ferroptim class, torch class, kwargs): every optimizer of the registry with its state
#: buffers in play (``train_kwargs``), and its AMP variants (``train_variants``).
FAMILIES: dict[str, tuple[type, type, dict[str, Any]]] = {
    name: (family.ferro, family.torch, {**family.fixed, **kwargs})
    for name, (family, kwargs) in train_cases(variants=True).items()
}
NAMES = tuple(FAMILIES)
#: Second-group overrides (every family has an ``lr``).
SECOND_GROUP = {"lr": 3e-3}


#: How GradScaler meets a ferroptim optimizer: "default" (GradScaler unscales, as for
#: torch's default optimizers) or "fused" (in-kernel unscaling: ``fused=True``).
AMP_PATHS = ["default", "fused"]


def make_opt(
    family: str, params: Any, *, torch_ref: bool = False, amp_path: str = "default", **extra: Any
) -> torch.optim.Optimizer:
    ferro_cls, torch_cls, kwargs = FAMILIES[family]
    if torch_ref:
        return torch_cls(params, **kwargs, foreach=False)
    if amp_path == "default":
        return ferro_cls(params, **kwargs, **extra)
    assert amp_path == "fused", amp_path
    if "fused" in inspect.signature(torch_cls).parameters:
        opt = ferro_cls(params, **kwargs, **extra, fused=True)
    else:
        # torch has no fused RMSprop; the attribute set by hand asks ferroptim's kernel
        # to take GradScaler's scale all the same.
        opt = ferro_cls(params, **kwargs, **extra)
        opt._step_supports_amp_scaling = True
    assert opt._step_supports_amp_scaling is True
    return opt


@pytest.fixture
def torch_backend() -> Iterator[None]:
    """ferroptim's torch path forced on CPU for the test's duration."""
    previous = ferroptim.get_backend()
    ferroptim.set_backend("torch")
    try:
        yield
    finally:
        ferroptim.set_backend(previous)


@pytest.fixture(params=["auto", "torch"], ids=["rust", "torch-backend"])
def backend(request: pytest.FixtureRequest) -> Iterator[str]:
    previous = ferroptim.get_backend()
    ferroptim.set_backend(request.param)
    try:
        yield request.param
    finally:
        ferroptim.set_backend(previous)


def assert_close_to_torch(
    actual: torch.Tensor,
    ref32: torch.Tensor,
    ref64: torch.Tensor,
    what: str,
    torch_error: float | None = None,
) -> None:
    """``actual`` (ferroptim) within float32 tolerance (rtol 1e-5, atol 1e-6) of torch's
    float32 result ``ref32``, the absolute part widened by twice the largest error torch's
    own float32 run makes on this tensor (``ref32`` vs ``ref64``, the same run in float64;
    or ``torch_error``, that error measured over a whole training run: where a model feeds
    params back into gradients, the two float32 runs drift apart along different paths and
    which one is nearer float64 at a given tensor and step is chance).

    Where the problem is well conditioned torch's float32 error is far below 1e-6 and this
    is the plain tolerance. Where it is not, any two correct float32 implementations
    disagree by more: RMSprop's momentum buffer sums terms ``grad / sqrt(square_avg)`` of
    about 10 (an ulp is 1e-6) that often cancel; a model feeds last-bit differences in its
    params back into its gradients; ferroptim's per-tensor norms (accumulated in float64,
    correctly rounded) are a few ulps from torch's float32 ones, so clipped gradients
    differ in their last bits; and torch's CPU float32 ``sqrt`` is not always correctly
    rounded (sqrt(0.001991097815334797) gives 0.04462171718, 0.04462172091 is nearer).
    Measured on this file's RMSprop runs, torch's float32 momentum buffers are ~2e-5 from
    float64 while ferroptim's are within ~1e-5 of torch's.
    """
    if torch.allclose(actual, ref32, **F32):
        return
    a, r32, r64 = actual.double(), ref32.double(), ref64.double()
    if torch_error is None:
        torch_error = float((r32 - r64).abs().max())
    allowed = F32["atol"] + 2 * torch_error + F32["rtol"] * r32.abs()
    excess = (a - r32).abs() - allowed
    if bool((excess > 0).any()):
        i = int(excess.argmax())
        values = ", ".join(
            f"{name} {float(t.reshape(-1)[i])!r}"
            for name, t in (("ferroptim", a), ("torch float32", r32), ("float64", r64))
        )
        raise AssertionError(
            f"{what}: element {i}: {values}; |ferroptim - torch| = "
            f"{float((a - r32).abs().reshape(-1)[i]):.3g} exceeds tolerance + 2 x torch's own "
            f"float32 error ({torch_error:.3g}); ferroptim's largest error vs "
            f"float64 is {float((a - r64).abs().max()):.3g}; "
            f"{int((excess > 0).sum())} element(s) out of {actual.numel()}"
        )


# ----------------------------------------------------------------------------------------
# Snapshots: params and optimizer state, compared bitwise
# ----------------------------------------------------------------------------------------


def take_snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in params],
        # Which params have state at all, and every value of it.
        "state": [
            None
            if p not in opt.state
            else {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()
            }
            for p in params
        ],
    }


def assert_bitwise_unchanged(
    before: dict[str, Any], opt: torch.optim.Optimizer, params: list[torch.Tensor], what: str
) -> None:
    after = take_snapshot(opt, params)
    for i, (x, y) in enumerate(zip(before["params"], after["params"], strict=True)):
        assert torch.equal(x, y), f"{what}: param {i} was written"
    for i, (sb, sa) in enumerate(zip(before["state"], after["state"], strict=True)):
        if sb is None:
            assert sa is None, f"{what}: param {i} got state {sorted(sa)}"
            continue
        assert sa is not None and set(sa) == set(sb), f"{what}: state keys of param {i}"
        for key, vb in sb.items():
            va = sa[key]
            if isinstance(vb, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), (
                    f"{what}: state {key!r} of param {i} changed"
                )
            else:
                assert va == vb, f"{what}: state {key!r} of param {i} changed"


def assert_matches(
    opt_a: torch.optim.Optimizer,
    params_a: list[torch.Tensor],
    opt_b: torch.optim.Optimizer,
    params_b: list[torch.Tensor],
    opt_64: torch.optim.Optimizer,
    params_64: list[torch.Tensor],
    what: str,
) -> None:
    """Params and every state tensor of ``a`` (ferroptim) close to ``b``'s (torch, same
    dtype; ``64``: torch in float64, the yardstick), steps equal."""
    for i, (pa, pb, p64) in enumerate(zip(params_a, params_b, params_64, strict=True)):
        assert_close_to_torch(pa.detach(), pb.detach(), p64.detach(), f"{what}: param {i}")
        assert (pa in opt_a.state) == (pb in opt_b.state), f"{what}: param {i} state presence"
        sa, sb, s64 = opt_a.state.get(pa, {}), opt_b.state.get(pb, {}), opt_64.state.get(p64, {})
        assert set(sa) == set(sb), f"{what}: param {i} state keys {sorted(sa)} != {sorted(sb)}"
        for key, vb in sb.items():
            va = sa[key]
            if key == "step":
                assert float(va) == float(vb), f"{what}: param {i} step {va} != {vb}"
            else:
                assert va.dtype == vb.dtype, f"{what}: param {i} {key} dtype"
                assert_close_to_torch(va, vb, s64[key], f"{what}: param {i} {key}")


# ----------------------------------------------------------------------------------------
# GradScaler
# ----------------------------------------------------------------------------------------


def mlp(seed: int = 0) -> torch.nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16), torch.nn.Tanh()
    )
    model.append(torch.nn.Linear(16, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def groups_of(model: torch.nn.Module) -> list[dict[str, Any]]:
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], **SECOND_GROUP}]


AMP_STEPS = 60
#: Steps whose gradient gets a non-finite value: (param index, flat index, value).
AMP_BAD = {
    3: (0, 5, float("inf")),
    4: (4, 0, float("nan")),  # two skips in a row
    17: (5, 3, float("-inf")),
    30: (2, 100, float("nan")),
    31: (1, 0, float("inf")),
    45: (3, 7, float("nan")),
}
MAX_NORM = 0.5


def train_with_scaler(
    family: str,
    recipe: str,
    init_scale: float,
    *,
    torch_ref: bool,
    ferro_clip: bool = False,
    dtype: torch.dtype = torch.float32,
    amp_path: str = "default",
) -> dict[str, Any]:
    """``AMP_STEPS`` GradScaler steps; returns per-step params/state/scale/gradients after
    ``scaler.step`` and the snapshot checks of the skipped steps."""
    model = mlp().to(dtype)
    params = list(model.parameters())
    extra = {"max_grad_norm": MAX_NORM} if recipe == "max_grad_norm" and not torch_ref else {}
    opt = make_opt(family, groups_of(model), torch_ref=torch_ref, amp_path=amp_path, **extra)
    scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale, growth_factor=2.0, backoff_factor=0.5, growth_interval=4
    )
    gen = torch.Generator().manual_seed(1)
    history = []
    clip_norms = []
    for step in range(AMP_STEPS):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)), y.to(dtype))
        scaler.scale(loss).backward()
        if step in AMP_BAD:
            index, flat, value = AMP_BAD[step]
            params[index].grad.view(-1)[flat] = value
        if recipe == "unscale_clip" or (recipe == "max_grad_norm" and torch_ref):
            scaler.unscale_(opt)
            clip = ferroptim.clip_grad_norm_ if ferro_clip else torch.nn.utils.clip_grad_norm_
            clip_norms.append(clip(params, MAX_NORM))
        before = take_snapshot(opt, params)
        step_scale = scaler.get_scale()
        scaler.step(opt)
        if step in AMP_BAD:
            assert_bitwise_unchanged(before, opt, params, f"skipped step {step}")
        if recipe == "max_grad_norm" and not torch_ref:
            clip_norms.append(opt.last_grad_norm)
        scaler.update()
        history.append(
            {
                "step_scale": step_scale,
                "scale": scaler.get_scale(),
                "grads": [p.grad.clone() for p in params],
                "params": [p.detach().clone() for p in params],
                "opt": copy.deepcopy(opt.state_dict()),
            }
        )
    return {"history": history, "opt": opt, "params": params, "clip_norms": clip_norms}


RECIPES = ["plain", "unscale_clip", "unscale_ferroclip", "max_grad_norm"]


def _assert_grads_as_torch(
    ferro: dict[str, Any], ref: dict[str, Any], recipe: str, amp_path: str, ferro_clip: bool
) -> None:
    """The gradients after scaler.step: unscaled in place by GradScaler on the default path
    and whenever the recipe called scaler.unscale_ (as torch's); still scaled where the
    kernel unscaled them as it read them.
    (max_grad_norm: torch's clip rewrote its gradients, ferroptim's kept them.)"""
    unscaled = amp_path == "default" or recipe == "unscale_clip"
    for step, (hf, ht) in enumerate(zip(ferro["history"], ref["history"], strict=True)):
        if step in AMP_BAD or recipe == "max_grad_norm":
            continue
        expected = 1.0 if unscaled else hf["step_scale"]
        for i, (gf, gt) in enumerate(zip(hf["grads"], ht["grads"], strict=True)):
            # Same params, same data, same scaler and clip: the same gradients (ferroptim's
            # clip_grad_norm_ is correctly rounded, torch's not: a few ulps apart).
            if step == 0 and unscaled and not ferro_clip:
                assert torch.equal(gf, gt), f"step 0: grad {i} differs from torch's"
            ratio = float(gf.double().norm() / gt.double().norm())
            assert math.isclose(ratio, expected, rel_tol=1e-3), (
                f"step {step}: grad {i} is {ratio} x torch's, expected {expected}"
            )


def _assert_scales_as_torch(
    ferro: dict[str, Any], ref: dict[str, Any], ref64: dict[str, Any], init_scale: float
) -> None:
    scales_f = [h["scale"] for h in ferro["history"]]
    scales_t = [h["scale"] for h in ref["history"]]
    assert scales_f == scales_t
    # The scaler did back off on the bad steps and grow in between.
    for step in AMP_BAD:
        previous = scales_f[step - 1] if step else init_scale
        assert scales_f[step] == previous * 0.5, f"step {step}: no backoff"
    assert max(scales_f) > init_scale
    assert scales_f == [h["scale"] for h in ref64["history"]]


def _torch_noise(ref: dict[str, Any], ref64: dict[str, Any]) -> dict[str, float]:
    """torch's own float32 error over the run, per kind of value (params, each state key)."""
    noise: dict[str, float] = {}
    for ht, h64 in zip(ref["history"], ref64["history"], strict=True):
        pairs = [("params", a, b) for a, b in zip(ht["params"], h64["params"], strict=True)]
        pairs += [
            (key, v, h64["opt"]["state"][i][key])
            for i, st in ht["opt"]["state"].items()
            for key, v in st.items()
            if key != "step"
        ]
        for key, a, b in pairs:
            noise[key] = max(noise.get(key, 0.0), float((a.double() - b.double()).abs().max()))
    return noise


def _assert_trajectory_as_exact_as_torch(
    ferro: dict[str, Any], ref: dict[str, Any], ref64: dict[str, Any]
) -> None:
    noise = _torch_noise(ref, ref64)
    histories = zip(ferro["history"], ref["history"], ref64["history"], strict=True)
    for step, (hf, ht, h64) in enumerate(histories):
        for i, (a, b, c) in enumerate(zip(hf["params"], ht["params"], h64["params"], strict=True)):
            assert_close_to_torch(a, b, c, f"step {step}: param {i}", noise["params"])
        sf, st, s64 = hf["opt"]["state"], ht["opt"]["state"], h64["opt"]["state"]
        assert set(sf) == set(st), f"step {step}: params with state"
        for i in st:
            assert set(sf[i]) == set(st[i])
            for key, vt in st[i].items():
                if key == "step":
                    assert float(sf[i][key]) == float(vt), f"step {step}: param {i} step"
                else:
                    assert sf[i][key].dtype == vt.dtype
                    assert_close_to_torch(
                        sf[i][key], vt, s64[i][key], f"step {step}: {i} {key}", noise[key]
                    )


def _assert_clip_norms_as_torch(
    ferro: dict[str, Any], ref: dict[str, Any], ref64: dict[str, Any]
) -> None:
    """The norms the clip saw (ferroptim: last_grad_norm) are torch's."""
    norms = zip(ferro["clip_norms"], ref["clip_norms"], ref64["clip_norms"], strict=True)
    for step, (nf, nt, n64) in enumerate(norms):
        if step in AMP_BAD:
            assert not math.isfinite(float(nt))
            continue
        assert_close_to_torch(nf, nt, n64, f"norm at step {step}")
    assert any(float(n) > MAX_NORM for s, n in enumerate(ref["clip_norms"]) if s not in AMP_BAD), (
        "clipping never kicked in"
    )


@pytest.mark.parametrize("amp_path", AMP_PATHS)
@pytest.mark.parametrize("init_scale", [2.0**12, 1000.0], ids=["pow2-scale", "scale-1000"])
@pytest.mark.parametrize(
    ("family", "recipe"),
    [
        (family, recipe)
        for family in NAMES
        for recipe in RECIPES
        # (ferroptim's max_grad_norm: not Adan's, whose reference has its own)
        if recipe != "max_grad_norm" or family in CLIPPING
    ],
)
def test_grad_scaler_matches_torch(family, recipe, init_scale, amp_path):
    ferro_clip = recipe == "unscale_ferroclip"
    recipe_ = "unscale_clip" if ferro_clip else recipe
    with kernel_calls() as calls:
        ferro = train_with_scaler(
            family, recipe_, init_scale, torch_ref=False, ferro_clip=ferro_clip, amp_path=amp_path
        )
    ref = train_with_scaler(family, recipe_, init_scale, torch_ref=True)
    ref64 = train_with_scaler(family, recipe_, init_scale, torch_ref=True, dtype=torch.float64)
    # The Rust kernel ran on every non-skipped step, once per group.
    assert calls.total() == 2 * (AMP_STEPS - len(AMP_BAD))
    _assert_grads_as_torch(ferro, ref, recipe_, amp_path, ferro_clip)
    _assert_scales_as_torch(ferro, ref, ref64, init_scale)
    _assert_trajectory_as_exact_as_torch(ferro, ref, ref64)
    if train_cases(variants=True)[family][0].has_step:
        steps = {float(s["step"]) for s in ferro["opt"].state.values()}
        assert steps == {float(AMP_STEPS - len(AMP_BAD))}
    if recipe != "plain":
        _assert_clip_norms_as_torch(ferro, ref, ref64)


def train_mixed_routes(
    family: str, *, torch_ref: bool, amp_path: str = "default"
) -> dict[str, Any]:
    """Two independent regressions in one optimizer: float32 params (Rust) and bfloat16
    params (routed to torch's implementation), one GradScaler. Independent, so each part
    can be held to its own dtype's tolerance."""
    gen = torch.Generator().manual_seed(0)
    w32 = torch.nn.Parameter(torch.randn(16, 8, generator=gen) * 0.3)
    w16 = torch.nn.Parameter((torch.randn(4, 8, generator=gen) * 0.3).bfloat16())
    b16 = torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))
    params = [w32, w16, b16]
    opt = make_opt(
        family,
        [{"params": [w32, w16]}, {"params": [b16], **SECOND_GROUP}],
        torch_ref=torch_ref,
        amp_path=amp_path,
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=1000.0, growth_interval=3)
    data = torch.Generator().manual_seed(1)
    bad = {4: (0, float("inf")), 9: (1, float("nan")), 10: (2, float("-inf"))}
    scales = []
    for step in range(25):
        x = torch.randn(16, 8, generator=data)
        y32, y16 = torch.randn(16, 16, generator=data), torch.randn(16, 4, generator=data)
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(x @ w32.t(), y32) + torch.nn.functional.mse_loss(
            (x.bfloat16() @ w16.t() + b16).float(), y16
        )
        scaler.scale(loss).backward()
        if step in bad:
            index, value = bad[step]
            params[index].grad.view(-1)[0] = value
        before = take_snapshot(opt, params)
        scaler.step(opt)
        if step in bad:
            assert_bitwise_unchanged(before, opt, params, f"skipped step {step}")
        scaler.update()
        scales.append(scaler.get_scale())
    return {"params": params, "opt": opt, "scales": scales}


@pytest.mark.parametrize("amp_path", AMP_PATHS)
@pytest.mark.parametrize("family", NAMES)
def test_grad_scaler_with_params_routed_to_torch(family, amp_path):
    """One optimizer, float32 params stepped in Rust and bfloat16 params stepped by torch:
    both unscaled exactly once, both skipped on inf/nan."""
    ferro = train_mixed_routes(family, torch_ref=False, amp_path=amp_path)
    ref = train_mixed_routes(family, torch_ref=True)
    assert ferro["scales"] == ref["scales"]
    for i, (a, b) in enumerate(zip(ferro["params"], ref["params"], strict=True)):
        tolerance = F32 if a.dtype == torch.float32 else BF16
        torch.testing.assert_close(
            a.detach(), b.detach(), **tolerance, msg=lambda m, i=i: f"param {i}: {m}"
        )
        sa, sb = ferro["opt"].state[a], ref["opt"].state[b]
        assert set(sa) == set(sb)
        for key, vb in sb.items():
            if key == "step":
                assert float(sa[key]) == float(vb)
            else:
                torch.testing.assert_close(
                    sa[key].float(), vb.float(), **tolerance, msg=lambda m, k=key: f"{k}: {m}"
                )


@pytest.mark.parametrize("amp_path", AMP_PATHS)
@pytest.mark.parametrize("family", NAMES)
def test_grad_scaler_with_forced_torch_backend(family, amp_path, torch_backend):
    """ferroptim's torch path under GradScaler: unscaled gradients by default, GradScaler's
    grad_scale/found_inf handed to torch's kernels with fused=True."""
    with kernel_calls() as calls:
        ferro = train_with_scaler(family, "plain", 1000.0, torch_ref=False, amp_path=amp_path)
    assert calls.total() == 0
    ref = train_with_scaler(family, "plain", 1000.0, torch_ref=True)
    ref64 = train_with_scaler(family, "plain", 1000.0, torch_ref=True, dtype=torch.float64)
    assert [h["scale"] for h in ferro["history"]] == [h["scale"] for h in ref["history"]]
    assert_matches(
        ferro["opt"],
        ferro["params"],
        ref["opt"],
        ref["params"],
        ref64["opt"],
        ref64["params"],
        "final",
    )


# ----------------------------------------------------------------------------------------
# _step_supports_amp_scaling: torch's, set only by fused=True
# ----------------------------------------------------------------------------------------

AMP_ATTR = "_step_supports_amp_scaling"


def amp_flag(opt: torch.optim.Optimizer) -> bool:
    return getattr(opt, AMP_ATTR, False)


def has_fused(family: str) -> bool:
    return "fused" in inspect.signature(FAMILIES[family][1]).parameters


#: (family, constructor extras): every family by default, with fused=False, and fused=True.
FLAG_CASES = [
    (family, extra)
    for family in NAMES
    for extra in ({}, {"fused": False}, {"fused": True})
    if not extra or has_fused(family)
]


def flag_case_id(case: tuple[str, dict[str, Any]]) -> str:
    family, extra = case
    return family + "".join(f"-{k}={v}" for k, v in extra.items())


def step_once(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 0.1 * (i + 1))
    opt.step()


@pytest.mark.parametrize("case", FLAG_CASES, ids=flag_case_id)
def test_amp_scaling_attribute_follows_torch(case):
    """``_step_supports_amp_scaling`` is set exactly where torch sets it (``fused=True``),
    and a value the user sets survives ``load_state_dict`` and is dropped by
    ``copy.deepcopy``/pickling exactly as torch's is."""
    family, extra = case
    ferro_cls, torch_cls, kwargs = FAMILIES[family]

    def pair() -> tuple[torch.optim.Optimizer, list, torch.optim.Optimizer, list]:
        fp = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.zeros(5))]
        tp = [torch.nn.Parameter(p.detach().clone()) for p in fp]
        return ferro_cls(fp, **kwargs, **extra), fp, torch_cls(tp, **kwargs, **extra), tp

    f, fp, t, tp = pair()
    assert amp_flag(f) is amp_flag(t) is bool(extra.get("fused"))
    step_once(f, fp)
    step_once(t, tp)
    assert amp_flag(f) is amp_flag(t)
    # A state_dict round trip (either way) keeps the attribute, as torch's does.
    f.load_state_dict(t.state_dict())
    t.load_state_dict(f.state_dict())
    assert amp_flag(f) is amp_flag(t) is bool(extra.get("fused"))
    for user_value in (not extra.get("fused"), bool(extra.get("fused"))):
        setattr(f, AMP_ATTR, user_value)
        setattr(t, AMP_ATTR, user_value)
        f.load_state_dict(copy.deepcopy(t.state_dict()))
        t.load_state_dict(copy.deepcopy(f.state_dict()))
        assert getattr(f, AMP_ATTR) is getattr(t, AMP_ATTR) is user_value
        step_once(f, fp)
        step_once(t, tp)
        assert getattr(f, AMP_ATTR) is getattr(t, AMP_ATTR) is user_value
        # A copy keeps only what __getstate__ returns: torch's drops the attribute.
        for clone in (copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))):
            assert amp_flag(clone(f)) is amp_flag(clone(t))


def record_step_inputs(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict]:
    """What each ``step`` call sees: GradScaler's attributes and the gradients."""
    seen: list[dict] = []

    def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        seen.append(
            {
                "grad_scale": getattr(optimizer, "grad_scale", None),
                "found_inf": getattr(optimizer, "found_inf", None),
                "grads": [p.grad.clone() for p in params],
            }
        )

    opt.register_step_pre_hook(hook)
    return seen


@pytest.mark.parametrize("amp_path", AMP_PATHS)
@pytest.mark.parametrize("family", NAMES)
def test_grad_scaler_meets_ferroptim_as_torch(family, amp_path):
    """Under GradScaler a default ferroptim optimizer is torch's default optimizer: the
    scaler unscales the gradients in place before ``step`` (bitwise the gradients torch's
    gets), never calls ``step`` on an overflow, and ``step`` then gives torch's numbers.
    With ``fused=True`` it is torch's fused optimizer: ``step`` receives the scale and the
    inf flag, runs on the overflow step too (and writes nothing), gradients stay scaled.
    (RMSprop has no fused option: the attribute set by hand, torch's default as reference.)
    """
    _, torch_cls, kwargs = FAMILIES[family]
    model_f, model_t = mlp(), mlp()
    pf, pt = list(model_f.parameters()), list(model_t.parameters())
    f = make_opt(family, pf, amp_path=amp_path)
    fused_ref = amp_path == "fused" and has_fused(family)
    # torch's default as a user writes it (no foreach=...), or torch's fused.
    t = torch_cls(pt, **kwargs, fused=True) if fused_ref else torch_cls(pt, **kwargs)
    assert amp_flag(f) is (amp_path == "fused")
    assert amp_flag(t) is fused_ref
    seen_f, seen_t = record_step_inputs(f, pf), record_step_inputs(t, pt)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2) for _ in "ft"]
    step_scales = []
    gen = torch.Generator().manual_seed(3)
    for step in range(6):
        x, y = torch.randn(16, 8, generator=gen), torch.randn(16, 4, generator=gen)
        step_scales.append(scalers[0].get_scale())
        for model, params, opt, scaler in zip(
            (model_f, model_t), (pf, pt), (f, t), scalers, strict=True
        ):
            opt.zero_grad()
            scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
            if step == 3:
                params[2].grad.view(-1)[1] = float("inf")
            scaler.step(opt)
            scaler.update()
        assert scalers[0].get_scale() == scalers[1].get_scale()
        for i, (a, b) in enumerate(zip(pf, pt, strict=True)):
            assert torch.allclose(a, b, **F32), f"step {step} param {i}"
    # GradScaler skips the overflow itself (5 calls) unless the optimizer takes its scale.
    assert len(seen_f) == (6 if amp_path == "fused" else 5)
    assert len(seen_t) == (6 if fused_ref else 5)
    for call, sf in enumerate(seen_f):
        if amp_path == "default":
            assert sf["grad_scale"] is None and sf["found_inf"] is None
        else:
            assert float(sf["grad_scale"]) == step_scales[call] > 1.0
            assert float(sf["found_inf"]) == float(call == 3)
    # The same params at the first step: the same gradients reach step(), bitwise
    # (unscaled by GradScaler's own kernel, or still scaled on both fused paths).
    for a, b in zip(seen_f[0]["grads"], seen_t[0]["grads"], strict=True):
        if amp_path == "default" or fused_ref:
            assert torch.equal(a, b)
        else:
            assert torch.equal(a, b * step_scales[0])  # a power of two: exact
    largest = max(float(g.abs().max()) for g in seen_f[0]["grads"])
    assert largest < 10.0 if amp_path == "default" else largest > 10.0


# ----------------------------------------------------------------------------------------
# skip_nonfinite
# ----------------------------------------------------------------------------------------

#: Two groups; the last tensor of group 1 is large enough to be split into parallel chunks.
SHAPES = (((37,), (6, 11), (1,)), ((9, 4), (70_001,)))


class Pair:
    """Identical params under a ferroptim optimizer (``f``) and torch's reference (``t``),
    plus torch's reference in float64 (``t64``: the yardstick of float32 noise)."""

    def __init__(self, family: str, seed: int = 0, **ferro_kwargs: Any) -> None:
        self.family = family
        gen = torch.Generator().manual_seed(seed)
        shapes = [s for group in SHAPES for s in group]
        init = [torch.randn(s, generator=gen) for s in shapes]
        self.fp = [torch.nn.Parameter(t.clone()) for t in init]
        self.tp = [torch.nn.Parameter(t.clone()) for t in init]
        self.f = make_opt(family, self._groups(self.fp), **ferro_kwargs)
        self.t = make_opt(family, self._groups(self.tp), torch_ref=True)
        self.p64 = [torch.nn.Parameter(t.double()) for t in init]
        self.t64 = make_opt(family, self._groups(self.p64), torch_ref=True)
        self.max_grad_norm = ferro_kwargs.get("max_grad_norm")
        self.gen = torch.Generator().manual_seed(seed + 1)

    @staticmethod
    def _groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        n0 = len(SHAPES[0])
        return [{"params": params[:n0]}, {"params": params[n0:], **SECOND_GROUP}]

    def grads(self, present: tuple[int, ...] | None = None) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for i, (a, b, c) in enumerate(zip(self.fp, self.tp, self.p64, strict=True)):
            if present is not None and i not in present:
                a.grad = b.grad = c.grad = None
                out.append(None)
                continue
            g = torch.randn(a.shape, generator=self.gen)
            a.grad, b.grad, c.grad = g.clone(), g.clone(), g.double()
            out.append(g)
        return out

    def step_both(self, n: int = 1, present: tuple[int, ...] | None = None) -> None:
        for _ in range(n):
            self.grads(present)
            self.f.step()
            for params, opt in ((self.tp, self.t), (self.p64, self.t64)):
                if self.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
                opt.step()

    def bad_step(
        self, where: tuple[int, int], value: float, present: tuple[int, ...] | None = None
    ):
        """A step whose gradients are finite but for one element: ferroptim must skip it
        (the reference does not step)."""
        self.grads(present)
        index, flat = where
        self.fp[index].grad.view(-1)[flat] = value
        before = take_snapshot(self.f, self.fp)
        skipped = self.f.skipped_steps
        self.f.step()
        assert_bitwise_unchanged(before, self.f, self.fp, "skipped step")
        assert self.f.skipped_steps == skipped + 1

    def check(self, what: str = "") -> None:
        assert_matches(self.f, self.fp, self.t, self.tp, self.t64, self.p64, what)


#: (param index, flat index, value): one bad element, in either group, in a body or tail.
BAD_ELEMENTS = {
    "nan-group0-first": ((0, 0), float("nan")),
    "inf-group0-last": ((1, 65), float("inf")),
    "neginf-group1-tail": ((4, 70_000), float("-inf")),
    "nan-group1-second-chunk": ((4, 65_536 + 3), float("nan")),
    "inf-group1-small": ((3, 35), float("inf")),
}


@pytest.mark.parametrize("bad", list(BAD_ELEMENTS))
@pytest.mark.parametrize("family", NAMES)
def test_skip_nonfinite_leaves_everything_unchanged(family, bad, backend):
    where, value = BAD_ELEMENTS[bad]
    pair = Pair(family, skip_nonfinite=True)
    pair.step_both(3)
    pair.check("before the bad step")
    pair.bad_step(where, value)
    pair.bad_step(where, value)  # twice in a row: the cached plan path too
    assert pair.f.skipped_steps == 2
    pair.step_both(3)
    pair.check("after the bad steps")
    assert pair.f.skipped_steps == 2


@pytest.mark.parametrize("family", NAMES)
def test_skip_nonfinite_on_first_step_creates_no_state(family, backend):
    pair = Pair(family, skip_nonfinite=True)
    # torch's Adagrad creates its state in __init__; the others on a param's first step.
    eager = len(pair.t.state) > 0
    assert len(pair.f.state) == len(pair.t.state)
    pair.bad_step((2, 0), float("nan"))
    if not eager:
        assert len(pair.f.state) == 0, "a skipped first step created state"
        assert all(p not in pair.f.state for p in pair.fp)
    pair.step_both(2)
    pair.check("after the first real steps")

    # State for params 0 and 3 only; then a bad step that would create the others'.
    pair = Pair(family, skip_nonfinite=True)
    pair.step_both(2, present=(0, 3))
    pair.bad_step((4, 70_000), float("inf"), present=(0, 1, 3, 4))
    with_state = {i for i, p in enumerate(pair.fp) if p in pair.f.state}
    assert with_state == ({0, 1, 2, 3, 4} if eager else {0, 3})
    pair.step_both(2)
    pair.check("after the late params' first real steps")


@pytest.mark.parametrize("family", [name for name in NAMES if name in CLIPPING])
def test_skip_nonfinite_with_max_grad_norm(family, backend):
    pair = Pair(family, skip_nonfinite=True, max_grad_norm=1.0)
    pair.step_both(3)
    pair.check("clipped steps")
    pair.bad_step((4, 123), float("nan"))
    pair.bad_step((0, 3), float("inf"))
    pair.step_both(3)
    pair.check("clipped steps after the skips")
    assert pair.f.skipped_steps == 2


@pytest.mark.parametrize("max_grad_norm", [None, 1.0], ids=["no-clip", "clip"])
def test_skip_nonfinite_huge_finite_grads_are_not_skipped(max_grad_norm):
    """Finite gradients whose float32 squares overflow are not non-finite: no skip."""
    pair = Pair("SGD", skip_nonfinite=True, max_grad_norm=max_grad_norm)
    pair.grads()
    for a, b, c in zip(pair.fp, pair.tp, pair.p64, strict=True):
        a.grad.mul_(1e30)
        b.grad.copy_(a.grad)
        c.grad.copy_(a.grad)
    assert all(bool(torch.isfinite(p.grad).all()) for p in pair.fp)
    pair.f.step()
    for params, opt in ((pair.tp, pair.t), (pair.p64, pair.t64)):
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    assert pair.f.skipped_steps == 0
    pair.check("huge finite gradients")


@pytest.mark.parametrize("family", ["Adam", "SGD", "Adagrad"])
def test_skip_nonfinite_warn_warns_once_per_skip(family):
    pair = Pair(family, skip_nonfinite="warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pair.step_both(2)
        pair.bad_step((0, 1), float("nan"))
        pair.step_both(1)
        pair.bad_step((4, 9), float("inf"))
        pair.bad_step((3, 0), float("-inf"))
        pair.step_both(1)
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 3, [str(w.message) for w in caught]
    assert all("non-finite" in str(w.message) for w in runtime)
    assert all(w.filename == __file__ for w in runtime), (
        "the warning should point at step()'s caller"
    )
    assert pair.f.skipped_steps == 3
    pair.check()


@pytest.mark.parametrize("family", ["AdamW", "RMSprop"])
def test_skip_nonfinite_true_does_not_warn(family):
    pair = Pair(family, skip_nonfinite=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair.step_both(1)
        pair.bad_step((1, 2), float("nan"))
        pair.step_both(1)
    assert pair.f.skipped_steps == 1


@pytest.mark.parametrize("family", NAMES)
def test_skipped_steps_in_state_dict(family):
    pair = Pair(family, skip_nonfinite=True)
    pair.step_both(2)
    pair.bad_step((0, 0), float("nan"))
    pair.step_both(1)
    pair.bad_step((4, 5), float("inf"))
    sd = pair.f.state_dict()
    assert sd["skipped_steps"] == 2

    # A fresh ferroptim optimizer restores the count (and then keeps counting).
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in pair.fp]
    fresh = make_opt(family, Pair._groups(fresh_params), skip_nonfinite=True)
    assert fresh.skipped_steps == 0
    fresh.load_state_dict(copy.deepcopy(sd))
    assert fresh.skipped_steps == 2
    assert fresh.state_dict()["skipped_steps"] == 2

    # torch's optimizer loads such a state_dict, and both continue to the same numbers.
    torch_params = [torch.nn.Parameter(p.detach().clone()) for p in pair.fp]
    ref = make_opt(family, Pair._groups(torch_params), torch_ref=True)
    ref.load_state_dict(copy.deepcopy(sd))
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        for a, b, c in zip(fresh_params, torch_params, pair.p64, strict=True):
            g = torch.randn(a.shape, generator=gen)
            a.grad, b.grad, c.grad = g.clone(), g.clone(), g.double()
        fresh.step()
        ref.step()
        pair.t64.step()  # the float64 yardstick, never interrupted
    assert_matches(fresh, fresh_params, ref, torch_params, pair.t64, pair.p64, "resumed")
    fresh_params[0].grad.view(-1)[0] = float("nan")
    fresh.step()
    assert fresh.skipped_steps == 3


@pytest.mark.parametrize("family", NAMES)
def test_skipped_steps_absent_without_skip_nonfinite(family):
    pair = Pair(family)
    pair.step_both(2)
    sd = pair.f.state_dict()
    assert "skipped_steps" not in sd
    assert set(sd) == set(pair.t.state_dict())
    # With skip_nonfinite off, a non-finite gradient is stepped through, as torch does.
    pair.grads()
    pair.fp[0].grad.view(-1)[0] = float("nan")
    pair.tp[0].grad.view(-1)[0] = float("nan")
    pair.f.step()
    pair.t.step()
    assert pair.f.skipped_steps == 0
    # (stepped through: the nan reaches the param or a state buffer; Rprop and Lion step
    # by signs, and torch's sign of NaN is 0: the NaN lands in Rprop's `prev` state or in
    # Lion's momentum, not in the param.)
    state = pair.f.state[pair.fp[0]]
    stepped = [pair.fp[0].detach(), *(v for v in state.values() if isinstance(v, torch.Tensor))]
    assert any(torch.isnan(t).any() for t in stepped)
    torch.testing.assert_close(pair.fp[0].detach(), pair.tp[0].detach(), equal_nan=True, **F32)


def test_skip_nonfinite_rejects_other_values():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for bad in ("yes", 1.5, "Warn", None):
        with pytest.raises(ValueError, match="skip_nonfinite"):
            ferroptim.Adam(p, skip_nonfinite=bad)
