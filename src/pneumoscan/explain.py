"""Grad-CAM (Selvaraju et al. 2017) on the last feature map, for the predicted class, without autograd.

The network ends in global average pooling and a dense head, ``logit = w2 . relu(W1 f + b1) + b2`` with
``f`` the mean of the feature map ``A`` (F, h, w) over its h*w positions. The gradient of the logit with
respect to ``A[c, i, j]`` is therefore the same at every position: ``g[c] / (h*w)``, where
``g = W1^T (w2 * [W1 f + b1 > 0])`` is the head's gradient with respect to the pooled features. Grad-CAM's
channel weights (the gradient averaged over positions) are ``g / (h*w)``, and the map is
``relu(sum_c weight[c] * A[c])``: numpy on the ONNX model's ``feature_map`` and ``features`` outputs and the
head's weights, no PyTorch. :func:`class_activation_map` keeps the autograd version as the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .images import ImageSource, Preprocessing, load_image, preprocessing_of

DISPLAY_MAX_SIDE = 1024


@dataclass
class Explanation:
    heatmap: np.ndarray  # float32 (H, W) in [0, 1], at the size of ``image``
    image: np.ndarray  # uint8 grey original (longest side at most 1024 px)
    probability: float
    label: str
    model: str | None = None  # which network the map explains, where not the whole model (an ensemble's primary)

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


class ClosedFormError(ValueError):
    """The network is not global average pooling then the dense head, so the closed form does not hold."""


def head_logit_and_gradient(features: np.ndarray, head: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
    """The dense head's logit for pooled ``features`` (F,) and its gradient with respect to them (F,).

    ``head``: ``w1`` (H, F), ``b1`` (H,), ``w2`` (1, H), ``b2`` (1,) (see :meth:`Bundle.head_weights`).
    Dropout is the identity at inference; ReLU's gradient at exactly 0 is taken as 0, as PyTorch does."""
    f = np.asarray(features, np.float64)
    pre = head["w1"] @ f + head["b1"]
    logit = float(head["w2"][0] @ np.maximum(pre, 0) + head["b2"][0])
    gradient = head["w1"].T @ (head["w2"][0] * (pre > 0))
    return logit, gradient


def grad_cam_map(feature_map: np.ndarray, features: np.ndarray, head: dict[str, np.ndarray], positive: bool):
    """Grad-CAM of one image from its last feature map ``(F, h, w)`` and pooled ``features`` ``(F,)``, for
    PNEUMONIA (``positive``) or NORMAL (the negated logit). Returns the map at the feature resolution,
    scaled to [0, 1], and the head's logit. Raises :class:`ClosedFormError` where ``features`` is not the
    mean of ``feature_map`` (a class token, a norm after pooling): there the formula is not Grad-CAM."""
    a = np.asarray(feature_map, np.float64)
    if not np.allclose(a.mean(axis=(1, 2)), features, rtol=1e-3, atol=1e-4):
        raise ClosedFormError("the pooled features are not the mean of the feature map")
    logit, gradient = head_logit_and_gradient(features, head)
    weights = (gradient if positive else -gradient) / (a.shape[1] * a.shape[2])  # mean gradient per channel
    cam = np.maximum(np.tensordot(weights, a, axes=1), 0)
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).astype(np.float32), logit


def explanation(image: Image.Image, cam: np.ndarray, probability: float, positive: bool) -> Explanation:
    """The map at feature resolution brought to the displayed image (longest side at most 1024 px)."""
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


def onnx_grad_cam(
    session,
    head: dict[str, np.ndarray],
    source: ImageSource,
    size: int | Preprocessing,
    threshold: float,
    temperature: float = 1.0,
    positive: bool | None = None,
) -> Explanation:
    """Explain one input with an ONNX Runtime ``session`` of the exported network (outputs ``logit``,
    ``features``, ``feature_map``): the heatmap of ``positive`` (PNEUMONIA) or not, by default of the
    class the model predicts."""
    from .bundle import ONNX_FEATURE_MAP, ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT
    from .metrics import sigmoid

    preprocessing = preprocessing_of(size)
    image = load_image(source, draft_size=preprocessing.size)
    x = preprocessing.apply(image)[None, None]
    logit, features, feature_map = session.run([ONNX_OUTPUT, ONNX_FEATURES, ONNX_FEATURE_MAP], {ONNX_INPUT: x})
    probability = float(sigmoid(float(logit[0]), temperature))
    positive = probability >= threshold if positive is None else positive
    cam, _ = grad_cam_map(feature_map[0], features[0], head, positive)
    return explanation(image, cam, probability, positive)


def class_activation_map(net, x, positive: bool) -> tuple[np.ndarray, float]:
    """Grad-CAM by autograd (needs PyTorch): one prepared image ``x`` (1,1,S,S) uint8 for PNEUMONIA
    (``positive``) or NORMAL. Returns the map at the feature resolution, scaled to [0, 1], and the logit.
    The reference that :func:`grad_cam_map` is tested against, and the path for networks without a dense head."""
    import torch

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
    if activation.dim() != 4:  # a ViT's tokens: no spatial feature map for Grad-CAM to weight
        from .errors import ConfigError

        raise ConfigError("Grad-CAM needs a convolutional feature map; this model's backbone (a ViT) has none")
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activation).sum(1))[0].detach().numpy()
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).astype(np.float32), float(logit.detach())


def grad_cam(
    net,
    source: ImageSource,
    size: int | Preprocessing,
    threshold: float,
    temperature: float = 1.0,
    positive: bool | None = None,
) -> Explanation:
    """Explain one input with the PyTorch network ``net`` (autograd): the heatmap of ``positive``
    (PNEUMONIA) or not, by default of the predicted class."""
    import torch

    from .metrics import sigmoid

    preprocessing = preprocessing_of(size)
    image = load_image(source, draft_size=preprocessing.size)
    x = torch.from_numpy(preprocessing.apply(image))[None, None]
    with torch.inference_mode():
        logit = float(net(x)[0])
    probability = float(sigmoid(logit, temperature))
    positive = probability >= threshold if positive is None else positive
    cam, _ = class_activation_map(net, x, positive)
    return explanation(image, cam, probability, positive)
