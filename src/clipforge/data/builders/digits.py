"""scikit-learn's bundled handwritten digits (1,797 8x8 scans, 17 grey levels): the paper's MNIST limitation in
small. Each is drawn as dark ink on white (``255 - v * 255 / 16``) and upscaled to the thumbnail size with
``resample`` (``"bicubic"`` by default: smooth strokes closer to handwriting; ``"nearest"`` keeps the 8x8
blocks). Caption "a handwritten digit seven" and variants; ``label`` = the digit, classes ``zero``..``nine``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from PIL import Image
from tqdm import tqdm

from clipforge.data.builders.captions import pick_templates
from clipforge.data.builders.core import PRIMARY_LABEL, Candidate, Collected, ImageOptions
from clipforge.data.raw import DataError

NAME = "digits"
PACKAGES: tuple[str, ...] = ()  # bundled with scikit-learn, no Debian package
LICENCE = (
    "scikit-learn's bundled copy (BSD-3-Clause) of the UCI 'Optical Recognition of Handwritten Digits' test set "
    "(Alpaydin & Kaynak 1998; CC BY 4.0 at the UCI repository)"
)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a scan of a handwritten {word}",
    "a handwritten {digit}",
)
_RESAMPLE = {"bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def digit_image(pixels: np.ndarray, size: int, resample: str = "bicubic") -> Image.Image:
    """One 8x8 digit (values 0..16) as a ``size`` x ``size`` RGB image, dark ink on white."""
    if resample not in _RESAMPLE:
        raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
    gray = np.rint(255.0 - np.asarray(pixels, dtype=np.float64) * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), _RESAMPLE[resample]).convert("RGB")


def collect(image_options: ImageOptions, *, resample: str = "bicubic", progress: bool = True) -> Collected:
    """All 1,797 digits (in scikit-learn's order) as thumbnails; source ``digits/NNNN`` is the array index."""
    try:
        import sklearn
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError(
            "digits: scikit-learn is not installed; install it with `pip install scikit-learn` "
            "(it bundles the digits, no download needed)"
        ) from exc
    data = load_digits()
    candidates: list[Candidate] = []
    for index in tqdm(
        range(len(data.images)), desc=NAME, unit="digit", disable=not progress, dynamic_ncols=True
    ):
        digit = int(data.target[index])
        source = f"digits/{index:04d}"
        word = NUMBER_WORDS[digit]
        captions = tuple(
            t.format(word=word, digit=digit) for t in pick_templates(CAPTION_TEMPLATES, source, 2)
        )
        image = digit_image(data.images[index], image_options.size, resample)
        candidates.append(
            Candidate(
                source=source,
                image=image_options.encode(image),
                captions=captions,
                classes=(word,),
                extra={
                    "digit": digit,
                    "index": index,
                    "licence": "BSD-3-Clause (scikit-learn)",
                    "package": "scikit-learn",
                },
            )
        )
    return Collected(
        candidates=candidates,
        dropped=Counter(),
        label_fields=(PRIMARY_LABEL,),
        packages=PACKAGES,
        licence={"licence": LICENCE},
        class_order={"label": list(NUMBER_WORDS)},
        notes={"scikit_learn": sklearn.__version__, "resample": resample, "ink": "dark on white"},
    )
