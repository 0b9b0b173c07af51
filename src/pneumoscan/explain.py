"""Grad-CAM (Selvaraju et al. 2017) on the last convolutional stage, for the predicted class."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .images import ImageSource, load_image, resize_square
from .metrics import sigmoid

DISPLAY_MAX_SIDE = 1024


@dataclass
class Explanation:
    heatmap: np.ndarray  # float32 (H, W) in [0, 1], at the size of ``image``
    image: np.ndarray  # uint8 grey original (longest side at most 1024 px)
    probability: float
    label: str

    def overlay(self, alpha: float = 0.45) -> Image.Image:
        """The heatmap in the 'jet' colours blended over the X-ray, as an RGB image."""
        from matplotlib import colormaps

        colours = colormaps["jet"](self.heatmap)[..., :3]
        grey = np.repeat(self.image[..., None] / 255.0, 3, axis=2)
        weight = alpha * self.heatmap[..., None]  # cool regions keep the X-ray visible
        return Image.fromarray(np.uint8(255 * ((1 - weight) * grey + weight * colours)), "RGB")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.overlay().save(path)
        return path


def class_activation_map(net, x: torch.Tensor, positive: bool) -> tuple[np.ndarray, float]:
    """Grad-CAM of one prepared image ``x`` (1,1,S,S) uint8 for PNEUMONIA (``positive``) or NORMAL.

    Returns the map at the feature resolution, scaled to [0, 1], and the logit."""
    net = net.eval()
    stage = net.body[-2]  # the last convolution, before pooling
    captured = {}
    hook = stage.register_forward_hook(lambda _m, _i, out: captured.__setitem__("a", out))
    try:
        with torch.enable_grad():
            logit = net(x)[0]
            activation = captured["a"]
            (grad,) = torch.autograd.grad(logit if positive else -logit, activation)
    finally:
        hook.remove()
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1))[0].detach().numpy()
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).astype(np.float32), float(logit.detach())


def grad_cam(net, source: ImageSource, size: int, threshold: float, temperature: float = 1.0) -> Explanation:
    """Explain the prediction for one input: the heatmap of the class the model predicts."""
    image = load_image(source)
    x = torch.from_numpy(resize_square(image, size))[None, None]
    with torch.inference_mode():
        logit = float(net(x)[0])
    probability = float(sigmoid(logit, temperature))
    positive = probability >= threshold
    cam, _ = class_activation_map(net, x, positive)
    scale = min(1.0, DISPLAY_MAX_SIDE / max(image.size))
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    heat = Image.fromarray(cam).resize(image.size, Image.Resampling.BILINEAR)
    heatmap = np.clip(np.asarray(heat, dtype=np.float32), 0, None)
    if heatmap.max() > 0:
        heatmap /= heatmap.max()
    return Explanation(
        heatmap, np.asarray(image, dtype=np.uint8), float(probability), "PNEUMONIA" if positive else "NORMAL"
    )
