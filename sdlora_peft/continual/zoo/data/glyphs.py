"""62 character classes rendered from matplotlib's bundled fonts: an image set that needs no download."""

from __future__ import annotations

import string
from pathlib import Path

import datasets
import numpy as np
import torch

from .common import cached, image_dataset, stratified_split

GLYPH_CHARS = string.digits + string.ascii_uppercase + string.ascii_lowercase
# The text faces among matplotlib's bundled fonts (symbol and size-variant faces such as cmsy or STIXSiz are not).
GLYPH_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf",
)  # fmt: skip
_GLYPHS_VERSION = 1  # bump when the rendering changes, so cached renders are rebuilt


def glyphs(
    *, cache: Path, seed: int, test_size: float, per_class: int = 300, image_size: int = 32
) -> datasets.DatasetDict:
    """62 classes (0-9, A-Z, a-z) of grey glyphs from matplotlib's fonts, rendered once and cached on disk.

    Each image draws a font, a rotation, a scale, a shift and a noise level from a generator seeded by `seed`.
    Glyphs keep their place on the baseline, so case pairs that differ mainly in size (``o``/``O``) stay apart.
    """
    folder = cache / "datasets" / f"glyphs-v{_GLYPHS_VERSION}-{per_class}x{image_size}px-seed{seed}-test{test_size}"

    def build() -> datasets.DatasetDict:
        images, labels = _render_glyphs(per_class, image_size, seed)
        return stratified_split(image_dataset(images, labels, list(GLYPH_CHARS)), test_size, seed)

    return cached(folder, build)


def _render_glyphs(per_class: int, image_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` augmented renders of every character, class by class: ``([N, S, S] uint8, [N] labels)``.

    The glyphs are drawn twice as large as `image_size`, warped in batches with ``grid_sample`` and shrunk by
    average pooling, which antialiases the edges.
    """
    bitmaps = torch.from_numpy(_glyph_bitmaps(2 * image_size)).flatten(0, 1)  # [fonts * chars, 2S, 2S]
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(GLYPH_CHARS)), per_class)
    sources = rng.integers(len(bitmaps) // len(GLYPH_CHARS), size=len(labels)) * len(GLYPH_CHARS) + labels
    warps = torch.from_numpy(_affine_warps(rng, len(labels))).transpose(1, 2)
    pixels = (torch.arange(2 * image_size) + 0.5) / image_size - 1  # pixel centres in [-1, 1] coordinates
    base = torch.stack([*torch.meshgrid(pixels, pixels, indexing="xy"), torch.ones(len(pixels), len(pixels))], -1)
    noise = rng.uniform(0, 12, (len(labels), 1, 1)) * rng.standard_normal((len(labels), image_size, image_size))
    images = np.empty((len(labels), image_size, image_size), dtype=np.uint8)
    for start in range(0, len(labels), 1024):
        chunk = slice(start, start + 1024)
        glyphs = bitmaps[sources[chunk]].unsqueeze(1).float()
        grid = base @ warps[chunk, None]  # [n, 2S, 2S, 2]: where each output pixel samples the glyph
        warped = torch.nn.functional.grid_sample(glyphs, grid, align_corners=False)
        small = torch.nn.functional.avg_pool2d(warped, 2).squeeze(1).numpy()
        images[chunk] = np.clip(small + noise[chunk], 0, 255).round().astype(np.uint8)
    return images, labels


def _affine_warps(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random warps ``[count, 2, 3]``: rotation within 12 degrees, scale 0.8-1.1, shift up to 8% of the width.

    Each matrix maps output to input coordinates (as ``affine_grid`` does), so it inverts the forward warp.
    """
    angle, scale = np.deg2rad(rng.uniform(-12, 12, count)), rng.uniform(0.8, 1.1, count)
    shift = rng.uniform(-0.16, 0.16, (count, 2))  # in [-1, 1] image coordinates: 8% of the width either way
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    inverse = np.stack([np.stack([cos, sin], -1), np.stack([-sin, cos], -1)], 1)  # [count, 2, 2]
    offset = -np.einsum("nij,nj->ni", inverse, shift)
    return np.concatenate([inverse, offset[..., None]], -1).astype(np.float32)


def _glyph_bitmaps(canvas: int) -> np.ndarray:
    """Every bundled text font's rendering of every character: white on black, centred, baseline at 30% height.

    Drawn through matplotlib's text-to-path and its Agg rasteriser, which need no display and no system fonts.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import RendererAgg
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextPath
    from matplotlib.transforms import Affine2D

    folder = Path(matplotlib.get_data_path(), "fonts", "ttf")
    em = canvas / 1.3  # room for descenders below the baseline and capitals above it
    bitmaps = []
    for font in (folder / name for name in GLYPH_FONTS if (folder / name).exists()):
        prop = FontProperties(fname=font)
        for char in GLYPH_CHARS:
            path = TextPath((0, 0), char, size=1, prop=prop)
            middle = (path.vertices[:, 0].min() + path.vertices[:, 0].max()) / 2  # control points: cheap, near enough
            place = Affine2D().translate(-middle, 0).scale(em).translate(canvas / 2, 0.3 * em)
            renderer = RendererAgg(canvas, canvas, 72)
            renderer.draw_path(renderer.new_gc(), path, place, (1, 1, 1))
            bitmaps.append(np.asarray(renderer.buffer_rgba())[..., 3].copy())
    return np.stack(bitmaps).reshape(-1, len(GLYPH_CHARS), canvas, canvas)
