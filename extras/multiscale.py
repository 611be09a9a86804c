"""--data-augmentation multiscale: training images at random input sizes, 0.6-1.0 of the model's own.

The R-CNN models resize every image inside (GeneralizedRCNNTransform), which would undo a resize done by the dataset
transforms; so multi-scale training replaces the model's resize. models.prepare_model installs it.
"""

import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

# training scales as factors of the model's input size: 0.6-1.0 in steps of 0.04 (480-800 px for min_size 800)
MULTISCALE_FACTORS = tuple(round(0.6 + 0.04 * k, 2) for k in range(11))


class MultiScaleResize(GeneralizedRCNNTransform):
    """The R-CNN models' own resize, which in training scales each image by a factor drawn from `factors` of its
    evaluation size: shorter side min_size x f and longer-side cap max_size x f, so every model, *_320_fpn included,
    sees other input sizes (a fixed cap would hold wide images at one size). Evaluation stays at the model's size.
    Install it as `model.transform = MultiScaleResize(model.transform)`; it holds no weights."""

    def __init__(self, transform, factors=MULTISCALE_FACTORS):
        super().__init__(
            transform.min_size[-1],
            transform.max_size,
            transform.image_mean,
            transform.image_std,
            size_divisible=transform.size_divisible,
            fixed_size=transform.fixed_size,
        )
        self.factors = tuple(factors)

    def resize(self, image, target=None):
        if not self.training:
            return super().resize(image, target)
        saved = self.min_size, self.max_size
        factor = self.factors[int(torch.randint(len(self.factors), ()))]
        self.min_size, self.max_size = (round(saved[0][-1] * factor),), round(saved[1] * factor)
        try:
            return super().resize(image, target)
        finally:
            self.min_size, self.max_size = saved
