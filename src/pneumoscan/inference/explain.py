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

from pneumoscan.io.images import ImageSource, Preprocessing, load_image, preprocessing_of

DISPLAY_MAX_SIDE = 1024


@dataclass
class Explanation:
    heatmap: np.ndarray  # float32 (H, W) in [0, 1], at the size of ``image``
    image: np.ndarray  # uint8 grey original (longest side at most 1024 px)
    probability: float
    label: str
    model: str | None = None  # which network the map explains, where not the whole model (an ensemble's primary)

    def blend(self) -> Image.Image:
        """The heatmap in the 'jet' colours over the X-ray, at the X-ray's size: each pixel's opacity comes
        from its map value (:func:`cam_alpha`), so where the map is low the film shows through untinted."""
        return Image.fromarray(_blend(self.image, self.heatmap), "RGB")

    def overlay(self) -> Image.Image:
        """The figure people see: :meth:`blend` with a band above it naming the predicted label and the
        probability of PNEUMONIA (and, for an ensemble, which network the map explains), and a colour bar on
        the right showing how each map value is drawn, transparent at the bottom."""
        return annotated(self.blend(), self.label, self.probability, self.model)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.overlay().save(path)
        return path


CAM_CLEAR = 0.2  # map values up to this are not drawn at all: the film shows through
CAM_OPAQUE = 0.65  # the opacity of the map's peak; the film is never hidden


def cam_alpha(heatmap: np.ndarray) -> np.ndarray:
    """Opacity of the colour drawn for each map value in [0, 1]: 0 up to :data:`CAM_CLEAR`, rising
    linearly to :data:`CAM_OPAQUE` at the peak."""
    ramp = np.clip((np.asarray(heatmap, np.float32) - CAM_CLEAR) / (1 - CAM_CLEAR), 0, 1)
    return CAM_OPAQUE * ramp


def _blend(grey: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps

    colours = colormaps["jet"](heatmap)[..., :3]
    film = np.repeat(np.asarray(grey, np.float32)[..., None] / 255.0, 3, axis=2)
    weight = cam_alpha(heatmap)[..., None]
    return np.uint8(np.round(255 * ((1 - weight) * film + weight * colours)))


def _font(size: int):
    """DejaVu Sans (shipped with matplotlib, a dependency) at ``size`` px; Pillow's own font otherwise."""
    from PIL import ImageFont

    try:
        import matplotlib

        return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts/ttf/DejaVuSans.ttf"), size)
    except OSError:
        return ImageFont.load_default(size)


def _fit(draw, text: str, font, width: float) -> str:
    """``text``, cut short with an ellipsis where it is wider than ``width`` px."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


LABEL_COLOURS = {"PNEUMONIA": (176, 32, 32), "NORMAL": (24, 96, 48)}


def annotated(blend: Image.Image, label: str, probability: float, model: str | None = None) -> Image.Image:
    """``blend`` with the label, probability and colour bar drawn around it (never over the film)."""
    from PIL import ImageDraw

    width, height = blend.size
    unit = max(12, round(0.034 * max(width, height)))  # the text size, in proportion to the film
    small = max(10, round(unit * 0.8))
    band = round(unit * 1.5 + small * 1.35 + unit * 0.5)
    big, little = _font(unit), _font(small)
    pad = round(unit * 0.4)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    bar_w = round(unit * 1.1)
    side = 3 * pad + round(
        max(
            bar_w + pad + max(measure.textlength(t, font=little) for t in ("high", "clear", "low")),
            measure.textlength("Grad-CAM", font=little),
        )
    )
    canvas = Image.new("RGB", (width + side, max(height + band, band + unit * 8)), "white")
    canvas.paste(blend, (0, band))
    draw = ImageDraw.Draw(canvas)
    head = f"{label}   P(pneumonia) = {probability:.3f}"
    draw.text(
        (pad, pad), _fit(draw, head, big, width + side - 2 * pad), font=big, fill=LABEL_COLOURS.get(label, "black")
    )
    what = f"Grad-CAM for {label}" + (f", of the {model}" if model else "")  # which class, which network
    text = _fit(draw, what, little, width + side - 2 * pad)
    draw.text((pad, pad + round(unit * 1.35)), text, font=little, fill=(60, 66, 80))
    # the colour bar: each value drawn as it is on a mid-grey film, so its clear bottom reads as such
    top, bottom = band + unit, band + min(height, unit * 14) - unit
    bar_x = width + pad * 2
    values = np.linspace(1, 0, max(bottom - top, 2), dtype=np.float32)[:, None].repeat(bar_w, axis=1)
    checks = np.where((np.arange(bar_w)[None, :] // 4 + np.arange(values.shape[0])[:, None] // 4) % 2, 150, 105)
    canvas.paste(Image.fromarray(_blend(checks, values), "RGB"), (bar_x, top))
    draw.rectangle((bar_x - 1, top - 1, bar_x + bar_w, top + values.shape[0]), outline=(60, 66, 80))
    label_x = bar_x + bar_w + pad
    for value, text in ((1.0, "high"), (CAM_CLEAR, "clear"), (0.0, "low")):
        y = top + round((1 - value) * (values.shape[0] - 1))
        draw.line((bar_x + bar_w, y, bar_x + bar_w + pad // 2 + 1, y), fill=(60, 66, 80))
        draw.text((label_x, y), text, font=little, fill=(60, 66, 80), anchor="lm")
    draw.text((bar_x, top - round(unit * 0.25)), "Grad-CAM", font=little, fill=(60, 66, 80), anchor="ld")
    return canvas


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
    from pneumoscan.core.metrics import sigmoid
    from pneumoscan.model.schema import ONNX_FEATURE_MAP, ONNX_FEATURES, ONNX_INPUT, ONNX_OUTPUT

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
        from pneumoscan.core.errors import ConfigError

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

    from pneumoscan.core.metrics import sigmoid

    preprocessing = preprocessing_of(size)
    image = load_image(source, draft_size=preprocessing.size)
    x = torch.from_numpy(preprocessing.apply(image))[None, None]
    with torch.inference_mode():
        logit = float(net(x)[0])
    probability = float(sigmoid(logit, temperature))
    positive = probability >= threshold if positive is None else positive
    cam, _ = class_activation_map(net, x, positive)
    return explanation(image, cam, probability, positive)
