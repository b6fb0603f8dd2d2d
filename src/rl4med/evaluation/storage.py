"""How generated samples are stored, and the metrics' real images made alike
(``evaluation.sample_format``).

``png`` (ours, the default): each sample's decoded float image rounded to uint8 and written
losslessly as ``.png``; the real test images of FD/FID and LPIPS resized in memory.

``jpeg75`` (the authors', parhamsaremi/rl4med-ddpo): a sample is the fp16 image in [0, 1] times
255 truncated to uint8, ``(x * 255).astype(np.uint8)``, saved by PIL as ``<id>.jpg`` with its
default quality 75 (scripts/eval.py:363-372); the real test images are decoded at full size,
resized to 512 x 512 (PIL bicubic, no crop) and saved as JPEG quality 75 too
(scripts/extract_dataset_latents.py:122-123). APR, FID and LPIPS then read the decoded JPEGs on
both sides. Here a real image goes through the same encoder and decoder in memory
(``as_stored``, ``real_image``): no file is written.

numpy and PIL only at import: the sample readers import this module.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_FORMATS = ("png", "jpeg75")
# the format where the config names none (runs from before the key keep their params)
DEFAULT_SAMPLE_FORMAT = "png"
# how the metrics read real images where the config names no evaluation.crop: squashed to the
# model's size, as the authors' metric code
DEFAULT_METRIC_CROP = "none"
_SUFFIX = {"png": ".png", "jpeg75": ".jpg"}
_PIL_FORMAT = {"png": "PNG", "jpeg75": "JPEG"}
# how a sample's float image becomes uint8 before it is stored (rl4med.sampling.to_uint8)
_ROUNDING = {"png": "round", "jpeg75": "floor"}
# the metrics' labels (Table 3's column names) say how the images were stored
_LABEL = {"png": "", "jpeg75": ", samples and real images as JPEG q75 (authors' storage)"}
CENTRE_CROP_LABEL = ", real images centre-cropped"


def check_sample_format(fmt: str) -> str:
    if fmt not in SAMPLE_FORMATS:
        raise ValueError(
            f"evaluation.sample_format {fmt!r}: use one of {', '.join(SAMPLE_FORMATS)}"
        )
    return fmt


def sample_suffix(fmt: str) -> str:
    """The file suffix of a stored sample: .png or .jpg."""
    return _SUFFIX[check_sample_format(fmt)]


def sample_rounding(fmt: str) -> str:
    """round (png) or floor (jpeg75, the authors' truncating ``astype(np.uint8)``)."""
    return _ROUNDING[check_sample_format(fmt)]


def metric_label_suffix(fmt: str, crop: str = "none") -> str:
    """What FD/FID's and LPIPS' labels add: the storage (jpeg75) and a centre-cropped reference."""
    return _LABEL[check_sample_format(fmt)] + (CENTRE_CROP_LABEL if crop == "center" else "")


def encode(image: np.ndarray, fmt: str) -> bytes:
    """A uint8 (H, W, 3) image as the bytes of its file. PIL's encoder with its defaults, as the
    authors' ``pil.save("<id>.jpg")``: for jpeg75, quality 75 with 4:2:0 chroma subsampling."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format=_PIL_FORMAT[fmt])
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    """The bytes of an image file as RGB uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def save_sample(image: np.ndarray, path: str | os.PathLike[str], fmt: str) -> None:
    """Write one sample (uint8 (H, W, 3)) in ``fmt``; ``path`` carries ``sample_suffix(fmt)``."""
    Path(path).write_bytes(encode(image, check_sample_format(fmt)))


def as_stored(image: np.ndarray, fmt: str) -> np.ndarray:
    """``image`` (uint8 (H, W, 3)) as it reads back once stored in ``fmt``: png unchanged
    (lossless), jpeg75 through the JPEG encoder and decoder, in memory."""
    if check_sample_format(fmt) == "png":
        return image
    return decode(encode(image, fmt))


def real_image(
    path: str, size: int, crop: str = DEFAULT_METRIC_CROP, fmt: str = DEFAULT_SAMPLE_FORMAT
) -> np.ndarray:
    """A real image as the metrics (FD/FID, LPIPS) compare samples with it: RGB uint8
    (size, size, 3), resized without cropping (``crop="none"``, the authors') or from its centre
    square. png: decoded at a reduced scale where the JPEG is much larger (``load_image``'s
    draft), as before the key; jpeg75: decoded at full size, resized, then stored and read
    back as a JPEG of quality 75, as the authors' reference images."""
    from rl4med.data.images import load_image

    authors = check_sample_format(fmt) == "jpeg75"
    return as_stored(load_image(path, size, crop, draft=not authors), fmt)
