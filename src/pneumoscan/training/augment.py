"""Training augmentation (the seed's, plus aspect and acquisition jitter) and the torch dataset that applies it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pneumoscan.core.settings import option
from pneumoscan.io.images import prepare


@dataclass(frozen=True)
class Augmentation:
    """The seed's augmentation (Keras ImageDataGenerator semantics), each part configurable.

    ``shear`` is in degrees, as Keras reads ``shear_range``; ``zoom`` 0.1 scales by 0.9 to 1.1;
    ``brightness``/``contrast`` (off by default) jitter intensity by that fraction; ``acquisition``
    (off by default) is the probability of one random acquisition change (:class:`AcquisitionJitter`)."""

    rotation: float = option(20.0, "max rotation in degrees", at_least=0, at_most=180)
    shift: float = option(0.1, "max width/height shift as a fraction", at_least=0, below=1)
    shear: float = option(0.1, "max shear in degrees, as Keras reads it", at_least=0, below=90)
    zoom: float = option(0.1, "zoom range: scale in [1-z, 1+z]", at_least=0, below=1)
    hflip: bool = option(True, "turn off random horizontal flips", flag="--no-hflip")
    brightness: float = option(0.0, "brightness jitter fraction (0: off)", at_least=0, at_most=1)
    contrast: float = option(0.0, "contrast jitter fraction (0: off)", at_least=0, at_most=1)
    acquisition: float = option(
        0.0,
        "probability of one random acquisition change per image: exposure, gamma, contrast, blur, noise, "
        "lower resolution or JPEG compression (0: off)",
        at_least=0,
        at_most=1,
    )
    aspect: float = option(
        0.0,
        "aspect jitter A: the content's width against its height rescaled by a factor drawn log-uniformly from "
        "[1/(1+A), 1+A], so that how much a film was squashed to a square tells nothing (full-resolution films "
        "span width/height 0.93-1.82: A 0.4 covers that spread; 0: off)",
        at_least=0,
        at_most=1,
        flag="--aspect-jitter",
    )

    def build(self):
        from torchvision.transforms import v2

        steps = [
            v2.RandomAffine(
                degrees=self.rotation,
                translate=(self.shift, self.shift),
                scale=(1 - self.zoom, 1 + self.zoom),
                shear=self.shear,
                interpolation=v2.InterpolationMode.BILINEAR,
            )
        ]
        if self.aspect:
            steps.append(AspectJitter(self.aspect))
        if self.hflip:
            steps.append(v2.RandomHorizontalFlip())
        if self.brightness or self.contrast:
            steps.append(v2.ColorJitter(brightness=self.brightness, contrast=self.contrast))
        if self.acquisition:
            steps.append(AcquisitionJitter(self.acquisition))
        return v2.Compose(steps)


@dataclass(frozen=True)
class AspectJitter:
    """The content's width against its height rescaled about the centre by a factor ``f`` drawn log-uniformly
    from ``[1/(1+a), 1+a]`` (width times sqrt(f), height divided by it: the area is kept), bilinear, black
    outside as for the other geometric changes. Takes and returns a uint8 tensor ``(1, S, S)``; draws from
    torch's generator only."""

    a: float

    def __call__(self, image):
        import math

        import torch

        factor = math.exp((2 * float(torch.rand(())) - 1) * math.log1p(self.a))
        return self.rescaled(image, factor)

    @staticmethod
    def rescaled(image, factor: float):
        """``image`` with its content's width/height multiplied by ``factor``."""
        import torch
        import torch.nn.functional as F

        root = factor**0.5
        theta = torch.tensor([[[1 / root, 0.0, 0.0], [0.0, root, 0.0]]])  # output -> input coordinates
        grid = F.affine_grid(theta, [1, *image.shape], align_corners=False)
        out = F.grid_sample(image.float()[None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return torch.clamp(torch.round(out[0]), 0, 255).to(torch.uint8)


@dataclass(frozen=True)
class AcquisitionJitter:
    """Another scanner or processing chain, imitated at random: with probability ``p``, one change drawn
    uniformly from seven kinds, each at a random strength. The ranges are continuous and wider than the
    fixed levels of :mod:`pneumoscan.io.shift`, which stay a held-out proxy rather than the training
    distribution. Takes and returns a uint8 tensor ``(1, S, S)``; draws from torch's generator only."""

    p: float

    KINDS = ("exposure", "gamma", "contrast", "blur", "noise", "resolution", "jpeg")

    def __call__(self, image):
        import torch

        if float(torch.rand(())) >= self.p:
            return image
        kind = self.KINDS[int(torch.randint(len(self.KINDS), ()))]
        return getattr(self, "_" + kind)(image, float(torch.rand(())))

    @staticmethod
    def _levels(image, f):
        import torch

        return torch.clamp(torch.round(f(image.float())), 0, 255).to(torch.uint8)

    def _exposure(self, image, u):
        return self._levels(image, lambda x: x * (0.7 + 0.6 * u))

    def _gamma(self, image, u):
        gamma = 0.6 * (1.6 / 0.6) ** u  # log-uniform in [0.6, 1.6]
        return self._levels(image, lambda x: 255 * (x / 255) ** gamma)

    def _contrast(self, image, u):
        return self._levels(image, lambda x: (x - x.mean()) * (0.6 + 0.8 * u) + x.mean())

    def _blur(self, image, u):
        from torchvision.transforms.v2 import functional as F

        return F.gaussian_blur(image, kernel_size=11, sigma=0.5 + 2.0 * u)

    def _noise(self, image, u):
        import torch

        return self._levels(image, lambda x: x + torch.randn_like(x) * (2 + 8 * u))

    def _resolution(self, image, u):
        import torch.nn.functional as F

        size = image.shape[-2:]
        small = [max(8, round(s * (0.2 + 0.5 * u))) for s in size]
        x = F.interpolate(image.float()[None], size=small, mode="area")
        return self._levels(F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0], lambda x: x)

    def _jpeg(self, image, u):
        from torchvision.io import decode_jpeg, encode_jpeg

        return decode_jpeg(encode_jpeg(image.contiguous(), quality=5 + round(45 * u)))


class ImageDataset:
    """Images and labels for training, augmented on the fly when asked: decoded in memory
    (``images``: a uint8 array ``(N,S,S)``) or read from disk at each access (``images``: paths).
    ``soft_targets`` (a teacher's probabilities, :mod:`pneumoscan.training.distill`) make each item
    ``(image, label, soft target)``; augmentation never changes them."""

    def __init__(
        self, images, labels, augmentation: Augmentation | None = None, size: int | None = None, soft_targets=None
    ):
        import torch

        self.images = torch.from_numpy(images) if isinstance(images, np.ndarray) else list(images)
        self.size = size
        self.labels = torch.as_tensor(list(labels), dtype=torch.float32)
        self.soft = None if soft_targets is None else torch.as_tensor(np.asarray(soft_targets), dtype=torch.float32)
        self.augment = augmentation.build() if augmentation else None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        import torch

        image = (
            self.images[i]
            if isinstance(self.images, torch.Tensor)
            else torch.from_numpy(prepare(self.images[i], self.size))
        )
        image = image.unsqueeze(0)
        if self.augment is not None:
            image = self.augment(image)
        if self.soft is not None:
            return image, self.labels[i], self.soft[i]
        return image, self.labels[i]
