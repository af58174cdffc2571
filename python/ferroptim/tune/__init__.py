"""Tuning helpers: an exact learning-rate range test and the gradient noise scale.

* :func:`lr_find` — the learning-rate range test (exponential or linear sweep, smoothed
  loss, early stop on divergence), with the model, optimizer, GradScaler and RNG states
  restored bitwise afterwards; suggestions by steepest descent and by fastai's valley rule.
* :func:`noise_scale` — the simple gradient noise scale B_simple of McCandlish et al.
  (2018) from gradient norms at two batch sizes, and the critical batch size it implies.

Both work with any ``torch.optim.Optimizer`` (torch's or ferroptim's) and any device.
``import ferroptim`` does not import this module; ``ferroptim.tune`` (or
``import ferroptim.tune``) does, and matplotlib / tqdm are imported only when a plot or a
progress bar is asked for.
"""

from ferroptim.tune._lr_find import LRFindResult, lr_find
from ferroptim.tune._noise_scale import NoiseScaleResult, noise_scale

__all__ = ["LRFindResult", "NoiseScaleResult", "lr_find", "noise_scale"]
