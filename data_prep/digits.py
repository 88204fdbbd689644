"""The built-in `digits` dataset: 28x28 grayscale digits 0-9 rendered with Pillow to look hand-written.

Each digit is drawn large (112 px) in a randomly chosen font, size and stroke width, then slanted,
rotated, squeezed and elastically warped (a random mesh warp), thickened or thinned and blurred, and
finally cropped, scaled into a 20x20 box and placed by its centre of mass in a 28x28 frame, the way
MNIST was made. Drawing large and downsampling gives anti-aliased strokes like scanned pen strokes.

The same seed gives the same images on machines with the same Pillow and the same fonts. Pillow's
own scalable font (ImageFont.load_default(size=...), Pillow >= 10.1) is always used, so nothing
depends on a system font; system TrueType fonts found in the usual folders add variety and are
recorded in the manifest (source.fonts).
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from data_prep.errors import DataError

HEIGHT = WIDTH = 28
CANVAS = 112  # drawing resolution (4x the output)
CHUNK = 500  # images per random stream: results do not depend on the number of processes

BUILTIN_FONT = "pillow-default"
# Fonts whose digits read well when warped; looked up in the usual folders, used when present.
FONT_FILES = [
    "DejaVuSans.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSansCondensed.ttf",
    "DejaVuSansCondensed-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Italic.ttf",
    "LiberationSans-Regular.ttf",
    "LiberationSans-Italic.ttf",
    "LiberationSerif-Italic.ttf",
    "FreeSans.ttf",
    "FreeSerifItalic.ttf",
]
FONT_DIRS = ["/usr/share/fonts", "/usr/local/share/fonts", os.path.expanduser("~/.fonts"), "/Library/Fonts"]


@functools.lru_cache(maxsize=1)
def find_fonts() -> tuple[str, ...]:
    """The built-in font plus the known TrueType fonts found on this machine (sorted, so stable)."""
    wanted = set(FONT_FILES)
    found = {}
    for folder in FONT_DIRS:
        for dirpath, _, filenames in os.walk(folder):
            for filename in filenames:
                if filename in wanted and filename not in found:
                    found[filename] = os.path.join(dirpath, filename)
    return (BUILTIN_FONT,) + tuple(found[name] for name in sorted(found))


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    if path == BUILTIN_FONT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(path, size=size)


def _warp(image: Image.Image, inverse: np.ndarray, offset: np.ndarray, jitter: float, rng, cells: int = 4):
    """Affine map plus an elastic-looking wobble in one resampling: a cells x cells mesh whose
    vertices take their source positions from the affine map, each moved by Gaussian noise."""
    size = image.size[0]
    step = size / cells
    grid = np.stack(np.meshgrid(np.arange(cells + 1), np.arange(cells + 1), indexing="xy"), -1) * step
    # (cells+1, cells+1, 2) output vertex (x, y) -> source position; shared vertices keep it smooth.
    source = grid @ inverse.T + offset + rng.normal(0.0, jitter, size=grid.shape)
    mesh = []
    for row in range(cells):
        for col in range(cells):
            box = (round(col * step), round(row * step), round((col + 1) * step), round((row + 1) * step))
            # quad corners in PIL's order: upper-left, lower-left, lower-right, upper-right.
            corners = (source[row, col], source[row + 1, col], source[row + 1, col + 1], source[row, col + 1])
            mesh.append((box, tuple(float(v) for corner in corners for v in corner)))
    return image.transform(image.size, Image.Transform.MESH, mesh, resample=Image.Resampling.BILINEAR)


def render_digit(digit: int, rng: np.random.Generator, fonts: tuple[str, ...]) -> np.ndarray:
    """One hand-written-looking digit: uint8 [28, 28], white on black."""
    font_path = fonts[int(rng.integers(len(fonts)))]
    size = int(rng.integers(64, 84))
    canvas = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(canvas)
    # Bold faces are already heavy: an extra outline would close their loops into blobs.
    bold = "Bold" in font_path
    stroke = int(rng.choice([0, 0, 1])) if bold else int(rng.choice([1, 2, 2, 3]))
    draw.text(
        (CANVAS / 2, CANVAS / 2), str(digit), fill=255, font=_font(font_path, size), anchor="mm",
        stroke_width=stroke, stroke_fill=255,
    )

    # Slant, rotation and squeeze: an affine map from output to input coordinates around the centre.
    angle = np.deg2rad(np.clip(rng.normal(0.0, 9.0), -22, 22))
    shear = rng.uniform(-0.15, 0.45)  # hands lean right more often than left
    squeeze = rng.uniform(0.75, 1.15)
    cos, sin = np.cos(angle), np.sin(angle)
    forward = np.array([[cos, -sin], [sin, cos]]) @ np.array([[squeeze, -shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)
    centre = np.array([CANVAS / 2, CANVAS / 2])
    offset = centre - inverse @ centre
    canvas = _warp(canvas, inverse, offset, jitter=rng.uniform(1.5, 4.0), rng=rng)

    # Pen weight: thicken or thin the stroke a little, then soften its edge.
    pen = rng.random()
    if pen < 0.2 and not bold:
        canvas = canvas.filter(ImageFilter.MaxFilter(3))
    elif pen > 0.85 and stroke >= 2:
        canvas = canvas.filter(ImageFilter.MinFilter(3))
    canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.8)))

    box = canvas.point(lambda v: 255 if v > 40 else 0).getbbox()
    if box is None:  # everything thinned away: draw again with other parameters
        return render_digit(digit, rng, fonts)
    glyph = canvas.crop(box)
    target = rng.uniform(17.0, 21.0)
    scale = target / max(glyph.size)
    new_size = (max(1, round(glyph.size[0] * scale)), max(1, round(glyph.size[1] * scale)))
    small = np.asarray(glyph.resize(new_size, Image.Resampling.LANCZOS), dtype=np.float32)

    # Place by centre of mass (as MNIST did), with a little jitter.
    total = small.sum()
    ys, xs = np.indices(small.shape)
    cy, cx = (ys * small).sum() / total, (xs * small).sum() / total
    top = int(round(HEIGHT / 2 - cy + rng.normal(0.0, 0.6)))
    left = int(round(WIDTH / 2 - cx + rng.normal(0.0, 0.6)))
    top = min(max(top, 0), HEIGHT - small.shape[0])
    left = min(max(left, 0), WIDTH - small.shape[1])
    frame = np.zeros((HEIGHT, WIDTH), np.float32)
    frame[top:top + small.shape[0], left:left + small.shape[1]] = small
    # Strokes saturate like ink on a scan (MNIST's have flat white cores): stretch so that the
    # brighter part of the stroke reaches white, leaving the anti-aliased edges grey.
    ink = frame[frame > 0.1 * frame.max()]
    frame *= rng.uniform(250.0, 255.0) / max(float(np.percentile(ink, 70)), 1.0)
    return np.clip(np.rint(frame), 0, 255).astype(np.uint8)


def _render_chunk(args) -> tuple[np.ndarray, np.ndarray]:
    seed, split_code, chunk, count, fonts = args
    rng = np.random.default_rng([seed, split_code, chunk])
    labels = rng.integers(0, 10, size=count)
    images = np.stack([render_digit(int(label), rng, fonts) for label in labels])
    return images, labels


SPLIT_CODES = {"train": 0, "test": 1}


def render_chunks(split: str, count: int, seed: int, chunk_size: int, workers: int | None = None):
    """Render a split's `count` digits as they are asked for: yields (uint8 [n, 28, 28, 1], int64 [n]), n <= chunk_size.

    Work is cut into jobs of CHUNK images, each with its own random stream seeded by (seed, split, job),
    so the images depend neither on chunk_size nor on how many processes render them; about chunk_size
    images are rendered (and held) at a time.
    """
    if count < 1:
        raise DataError(f"digits: {split} size must be at least 1, got {count}")
    fonts = find_fonts()
    jobs = [(seed, SPLIT_CODES[split], job, min(CHUNK, count - job * CHUNK), fonts)
            for job in range((count + CHUNK - 1) // CHUNK)]
    # A process pool costs more than it saves for a few jobs (tests, previews).
    workers = min(len(jobs), workers or (os.cpu_count() or 1 if len(jobs) >= 4 else 1))
    per_round = max(workers, chunk_size // CHUNK)  # jobs rendered together: about a chunk, every process busy
    pool = ProcessPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for start in range(0, len(jobs), per_round):
            part = jobs[start:start + per_round]
            rendered = list(pool.map(_render_chunk, part) if pool is not None else map(_render_chunk, part))
            images = np.concatenate([images for images, _ in rendered])[..., None]  # (n, 28, 28, 1)
            labels = np.concatenate([labels for _, labels in rendered]).astype(np.int64)
            for offset in range(0, len(labels), chunk_size):
                yield images[offset:offset + chunk_size], labels[offset:offset + chunk_size]
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def make_digits(sizes: dict[str, int], seed: int, workers: int | None = None) -> dict:
    """Render whole splits ({'train': 60000, 'test': 10000}): split -> (uint8 [N, 28, 28, 1], int64 [N])."""
    out = {}
    for split, count in sizes.items():
        chunks = list(render_chunks(split, count, seed, chunk_size=max(1, count), workers=workers))
        out[split] = tuple(np.concatenate(parts) for parts in zip(*chunks))  # (images, labels)
    return out
