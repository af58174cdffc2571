"""ferroptim inside PyTorch Lightning's Trainer (CPU, a few steps of a tiny model).

A default ferroptim optimizer must be what a default torch.optim one is to Lightning:
``gradient_clip_val`` works under ``bf16-mixed`` and under ``16-mixed`` (GradScaler
unscales, Lightning clips), training gives torch.optim's numbers, and a run resumed from
a Lightning checkpoint continues as the uninterrupted run does. With ``fused=True`` it
is what torch's fused optimizer is: Lightning refuses to clip.

Lightning turns ``precision="16-mixed"`` on CPU into ``bf16-mixed`` (with a warning);
float16 autocast with a CPU GradScaler is still Lightning's own code path when its
``MixedPrecision("16-mixed", "cpu")`` plugin is passed explicitly, which is what the
16-mixed tests do.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from conftest import ferroptim
from pytorch_lightning.plugins.precision import MixedPrecision

pytestmark = [
    pytest.mark.usefixtures("torch_single_threaded"),
    # Lightning's advice about DataLoader workers and logging is noise for a 4-batch set.
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*smaller than the logging interval"),
    pytest.mark.filterwarnings("ignore:.*`training_step` returned `None`"),
]

MakeOpt = Callable[[Any], torch.optim.Optimizer]

ADAMW = {"lr": 1e-2, "weight_decay": 0.1}
CLIP = 0.05  # well below the gradient norms here, so clipping changes every step
BATCHES_PER_EPOCH = 4


def ferro_adamw(params: Any) -> torch.optim.Optimizer:
    return ferroptim.AdamW(params, **ADAMW)


def torch_adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, **ADAMW)


class Regressor(pl.LightningModule):
    """A two-layer MLP, the same initial weights every time; records what each
    optimizer step sees (the global gradient norm, after Lightning's clipping)."""

    def __init__(self, make_opt: MakeOpt, inf_at: int | None = None) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.make_opt = make_opt
        self.inf_at = inf_at  # the batch whose loss is made infinite (fp16 overflow)
        self.batches = 0
        self.step_norms: list[float] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], index: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        if self.batches == self.inf_at:
            loss = loss * float("inf")
        self.batches += 1
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = self.make_opt(self.parameters())

        def record(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            grads = [p.grad for g in optimizer.param_groups for p in g["params"]]
            self.step_norms.append(float(torch.nn.utils.get_total_norm(grads)))

        # After the step: Lightning runs the closure (forward, backward, unscale, clip)
        # inside or before step(), and neither optimizer writes the gradients.
        opt.register_step_post_hook(record)
        return opt


def loader() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(1)
    n = 16 * BATCHES_PER_EPOCH
    data = torch.utils.data.TensorDataset(
        torch.randn(n, 8, generator=gen), torch.randn(n, 4, generator=gen)
    )
    return torch.utils.data.DataLoader(data, batch_size=16, shuffle=False)


def trainer(max_steps: int, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def fit(make_opt: MakeOpt, max_steps: int, **kwargs: Any) -> tuple[Regressor, pl.Trainer]:
    inf_at = kwargs.pop("inf_at", None)
    model = Regressor(make_opt, inf_at)
    t = trainer(max_steps, **kwargs)
    t.fit(model, loader())
    return model, t


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_close(a: torch.nn.Module, b: torch.nn.Module, what: str, **tol: float) -> None:
    tol = tol or {"rtol": 1e-5, "atol": 1e-6}
    for i, (x, y) in enumerate(zip(params_of(a), params_of(b), strict=True)):
        torch.testing.assert_close(x, y, **tol, msg=lambda m, i=i: f"{what}: param {i}: {m}")


def test_default_optimizer_is_not_fused_to_lightning():
    from lightning_fabric.plugins.precision.amp import _optimizer_handles_unscaling

    p = [torch.nn.Parameter(torch.zeros(3))]
    assert not _optimizer_handles_unscaling(ferroptim.AdamW(p))
    assert not _optimizer_handles_unscaling(ferroptim.RMSprop(p))
    assert _optimizer_handles_unscaling(ferroptim.AdamW(p, fused=True))
    assert _optimizer_handles_unscaling(torch.optim.AdamW(p, fused=True))


@pytest.mark.parametrize("clip", [None, CLIP], ids=["no-clip", "clip"])
def test_bf16_mixed_with_gradient_clipping_matches_torch(clip):
    steps = 6
    kwargs = {"precision": "bf16-mixed", "gradient_clip_val": clip}
    ferro, tf = fit(ferro_adamw, steps, **kwargs)
    ref, tr = fit(torch_adamw, steps, **kwargs)
    assert tf.global_step == tr.global_step == steps
    assert len(ferro.step_norms) == len(ref.step_norms) == steps
    if clip is None:
        assert min(ferro.step_norms) > CLIP
    else:
        # Lightning clipped before each ferroptim step (norm-based clipping, the default).
        assert max(ferro.step_norms) <= CLIP * (1 + 1e-5)
    # bf16 autocast rounds activations to 8 bits of mantissa: a last-bit difference in a
    # float32 param can move an activation by one bf16 ulp, so the tolerance is bf16's.
    assert_params_close(ferro, ref, "bf16-mixed", rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(ferro.step_norms, ref.step_norms, rtol=1e-2, atol=1e-4)


def sixteen_mixed(**kwargs: Any) -> dict[str, Any]:
    """Lightning's 16-mixed on CPU: float16 autocast and its own CPU GradScaler."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)], **kwargs}


def test_16_mixed_grad_scaler_with_gradient_clipping_matches_torch():
    steps = 8
    inf_at = 4  # the fifth batch overflows: GradScaler skips the step and backs off
    ferro, tf = fit(ferro_adamw, steps, inf_at=inf_at, **sixteen_mixed(gradient_clip_val=CLIP))
    ref, tr = fit(torch_adamw, steps, inf_at=inf_at, **sixteen_mixed(gradient_clip_val=CLIP))
    scaler_f, scaler_t = tf.precision_plugin.scaler, tr.precision_plugin.scaler
    assert scaler_f is not None and scaler_f.get_scale() == scaler_t.get_scale()
    # GradScaler called step() on every batch but the overflowing one, for both.
    assert len(ferro.step_norms) == len(ref.step_norms) == steps - 1
    # The scaler unscaled the gradients before Lightning clipped them: clipped norms.
    assert max(ferro.step_norms) <= CLIP * (1 + 1e-5)
    assert ferroptim.AdamW is type(tf.optimizers[0])
    state = tf.optimizers[0].state
    assert {float(s["step"]) for s in state.values()} == {float(steps - 1)}
    assert_params_close(ferro, ref, "16-mixed", rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_fused_optimizers_refuse_clipping_like_torch(precision):
    """fused=True means in-kernel unscaling, for ferroptim as for torch: Lightning refuses
    gradient_clip_val for both, with the same error (use ``max_grad_norm=`` instead)."""
    kwargs = (
        sixteen_mixed(gradient_clip_val=CLIP)
        if precision == "16-mixed"
        else {"precision": precision, "gradient_clip_val": CLIP}
    )
    outcomes = []
    for cls in (ferroptim.AdamW, torch.optim.AdamW):
        try:
            model, _ = fit(lambda p, cls=cls: cls(p, fused=True, **ADAMW), 2, **copy.copy(kwargs))
            outcomes.append(("ok", max(model.step_norms) <= CLIP * (1 + 1e-5)))
        except RuntimeError as error:
            outcomes.append(("error", str(error).replace(cls.__name__, "<cls>")))
    assert outcomes[0] == outcomes[1]
    # Lightning reads the attribute as "fused" under either precision.
    assert outcomes[0][0] == "error" and "unscaling of gradients internally" in outcomes[0][1]


def epochs_trainer(max_epochs: int, **kwargs: Any) -> pl.Trainer:
    return trainer(-1, max_epochs=max_epochs, **kwargs)  # max_steps=-1: no step limit


@pytest.mark.parametrize("first", ["ferroptim", "torch"])
def test_resume_from_checkpoint_continues_identically(first, tmp_path: Path):
    """One epoch (4 steps), a Lightning checkpoint, a new Trainer and a new model resumed
    from it for a second epoch: the same params as two uninterrupted epochs (bitwise for
    ferroptim after ferroptim) and torch.optim's. ``first`` made the checkpoint; ferroptim
    always resumes it (torch.optim's checkpoints load into ferroptim).

    Epochs, not ``max_steps``: resuming a ``max_steps`` run whose checkpoint ends an epoch
    replays a batch in Lightning 2.6 (torch.optim's run as well), so the two would
    differ for reasons of Lightning's own.
    """
    kwargs = {"gradient_clip_val": CLIP}
    first_opt = ferro_adamw if first == "ferroptim" else torch_adamw
    t1 = epochs_trainer(1, **kwargs)
    t1.fit(Regressor(first_opt), loader())
    ckpt = tmp_path / "epoch1.ckpt"
    t1.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    assert {float(s["step"]) for s in saved["state"].values()} == {float(BATCHES_PER_EPOCH)}

    resumed = Regressor(ferro_adamw)
    t2 = epochs_trainer(2, **kwargs)
    t2.fit(resumed, loader(), ckpt_path=ckpt)
    assert t2.global_step == 2 * BATCHES_PER_EPOCH
    assert isinstance(t2.optimizers[0], ferroptim.AdamW)
    assert len(resumed.step_norms) == BATCHES_PER_EPOCH  # only the second epoch ran
    # The resumed optimizer continued from the checkpoint's state (steps 5..8).
    state = t2.optimizers[0].state_dict()["state"]
    assert {float(s["step"]) for s in state.values()} == {float(2 * BATCHES_PER_EPOCH)}

    straight = {}
    for name, make_opt in (("ferroptim", ferro_adamw), ("torch", torch_adamw)):
        straight[name] = Regressor(make_opt)
        epochs_trainer(2, **kwargs).fit(straight[name], loader())
    if first == "ferroptim":
        for a, b in zip(params_of(resumed), params_of(straight["ferroptim"]), strict=True):
            assert torch.equal(a, b)
    assert_params_close(resumed, straight["torch"], "resumed vs torch.optim")
    # And torch.optim resumed from the same checkpoint lands where ferroptim does.
    resumed_torch = Regressor(torch_adamw)
    epochs_trainer(2, **kwargs).fit(resumed_torch, loader(), ckpt_path=ckpt)
    assert_params_close(resumed, resumed_torch, "resumed ferroptim vs resumed torch.optim")
