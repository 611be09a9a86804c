"""--ema DECAY: an exponential moving average of the weights, evaluated and saved in place of the raw ones.

After each optimizer step, ema = d * ema + (1 - d) * weights. The decay d ramps up as d = DECAY * (1 - exp(-updates /
2000)), so the average is not held back by the random heads of the first steps (the warm-up YOLOv5 and timm use).
The average moves more smoothly than the weights, which the last steps of SGD shake: it often scores a little higher
and needs no lr schedule tuned to the last epoch.

train.py evaluates `ModelEMA.module` when --ema is on and saves its weights as the checkpoint's "model" (what
--test-only, predict.py and export read), with the raw weights under "model_raw" and the update count under
"ema_updates", from which --resume restores both. Delete this file and its calls in train.py and runs train and save
the raw weights.
"""

import copy
import math

import torch


class ModelEMA:
    """The moving average of `model`'s state (floating-point parameters and buffers; integer buffers copied)."""

    def __init__(self, model, decay=0.9998, ramp=2000, updates=0):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, updates

    @torch.no_grad()
    def update(self, model):
        """Fold the current weights of `model` (the same architecture, DDP's .module) into the average."""
        self.updates += 1
        decay = self.decay * (1 - math.exp(-self.updates / self.ramp))
        current = model.state_dict()
        for name, value in self.module.state_dict().items():
            if value.is_floating_point():
                value.lerp_(current[name].detach(), 1 - decay)  # value += (1 - d) * (weight - value)
            else:
                value.copy_(current[name])

    def load(self, state, updates):
        self.module.load_state_dict(state)
        self.updates = updates
