"""Image input/output for `cnnlab predict RUN_DIR IMAGE...`.

`load_image(path, size)` turns a user's picture into what a model trained on MNIST-style
data expects: a float32 array of shape (H, W) = `size`, values in [0, 1], a light
(white) digit on a dark (black) background. It also returns a list of human-readable
notes, one per conversion it applied, so `predict` can say what it did to the picture.
`save_labeled_image` writes the model's view of the image, enlarged, with the prediction.

Rules (the README quotes this list):

1. **What is accepted.** PNG, JPEG and any other format Pillow can read, as long as the
   file holds one still image. Animated or multi-page files (GIF, APNG, WebP, TIFF with
   several frames) are refused; a camera MPO file is read as its first (main) picture.
2. **What is refused**, always with `cnnlab.errors.ImageError` naming the file and what to
   do: a missing path or a directory, an empty (0-byte) file, a file that is not an image,
   a truncated or corrupt image (Pillow's `verify()` on a first open, then a full decode on
   a second open), and a decompression bomb: an image whose header declares more than
   `MAX_PIXELS` (50 megapixels) pixels is refused *before any pixel is decoded*. Pillow's
   own bomb limit (`Image.MAX_IMAGE_PIXELS`) is enforced as well, its warning turned into
   a refusal.
3. **Orientation.** The EXIF orientation tag is applied first (`ImageOps.exif_transpose`),
   so a phone photo is read the way it is displayed.
4. **To grayscale, in [0, 1].**
   - transparency (RGBA, LA, PA, premultiplied modes, palette or RGB/L with a
     transparent colour) is composited over a *white* background, then made grayscale;
   - RGB, palette (P), CMYK, YCbCr, LAB, HSV and 1-bit images become grayscale with
     Pillow's ITU-R 601-2 luma (`convert("L")`), then are divided by 255;
   - 16-bit grayscale (`I;16*` modes) is divided by its real white level, 2**bits - 1,
     where bits is the TIFF BitsPerSample tag when present (12-bit TIFFs) and 16 otherwise
     (PNG, PGM, ...); never clipped to 8 bits, and kept in float, so no precision is lost;
   - 32-bit integer (`I`) images from PNG or PGM (Pillow reads 16-bit ones that way) are
     16-bit, from TIFF they use BitsPerSample; an `I` image with more than 16 bits, or one
     whose values do not fit its nominal depth, is stretched linearly from its min..max;
   - floating-point (`F`) images are used as they are when all values lie in [0, 1],
     stretched from min..max otherwise; NaN or infinite values are refused.
5. **Polarity** (`invert=`): `"yes"` always inverts (v -> 1 - v), `"no"` never does, and
   `"auto"` (the default) inverts when the image's *border* is bright, i.e. the median of
   a frame 5% of the shorter side wide (at least 1 px) is above 0.5: dark strokes on a
   light background, as on paper, become light on dark, as in MNIST. Any other value is
   refused with ImageError.
6. **Size** (`size=(H, W)`, from the model, any H x W): an image already H x W is used
   pixel for pixel. Otherwise (`fit="image"`, the default) the whole image is resized,
   aspect ratio kept, to fit inside H x W (Lanczos filter; a box `reduce()` first for big
   reductions, so huge images are quick) and centered; the rest is padded with the
   background level, the median of the border after the polarity step.
   `fit="content"` does what MNIST did to its digits instead: crop to the content's
   bounding box (pixels above halfway between background and the brightest value), resize
   it, aspect kept, to fit in the central 20/28 of the target (20 x 20 of 28 x 28), and
   place it so that its center of mass is at the center; with no content found (contrast
   below 0.1) it falls back to `fit="image"`.
7. **Deterministic.** No randomness, no dependence on time or environment: the same file
   gives the same array, bit for bit, with the same numpy/Pillow.

Sizes in notes are written the way image viewers write them: width x height.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cnnlab.errors import ImageError

# Refuse images declaring more pixels than this, before decoding them (50 megapixels:
# a 8660 x 5773 photo; the grayscale float copy is then 200 MB).
MAX_PIXELS = 50_000_000

INVERT_CHOICES = ("auto", "yes", "no")
FIT_CHOICES = ("image", "content")

# fit="content": the digit's box is this fraction of the target (MNIST: 20 of 28).
CONTENT_FRACTION = 20 / 28
# fit="content": below this contrast (brightest - background) there is no content.
MIN_CONTENT_CONTRAST = 0.1
# Border frame used to estimate the background: this fraction of the shorter side.
BORDER_FRACTION = 0.05

_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_COLOR_MODES = {"RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
_LANCZOS = Image.Resampling.LANCZOS
_ORIENTATION_TAG = 0x0112
_ORIENTATION_NAMES = {
    2: "mirrored left-right",
    3: "rotated 180 degrees",
    4: "mirrored top-bottom",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}


def load_image(path, size: tuple[int, int], invert: str = "auto", *, fit: str = "image") -> tuple[np.ndarray, list[str]]:
    """Return (float32 array (H, W) in [0, 1], notes) ready for a model trained on MNIST-style
    data (white digit on black background), and a list of human-readable notes describing each
    conversion applied (e.g. 'converted RGBA to grayscale over a white background',
    'inverted (dark strokes on light background detected)'). See the module docstring for the
    rules. Raises ImageError for anything that is not a usable single still image."""
    height, width = _check_size(size)
    if not isinstance(invert, str) or invert not in INVERT_CHOICES:
        raise ImageError(f"invalid invert setting {invert!r}: use one of 'auto', 'yes' or 'no'")
    if not isinstance(fit, str) or fit not in FIT_CHOICES:
        raise ImageError(f"invalid fit setting {fit!r}: use one of 'image' or 'content'")

    notes: list[str] = []
    im = _open_verified(path, notes)
    im = _apply_orientation(im, path, notes)
    gray = _to_gray(im, path, notes)
    im.close()

    border = _border_median(gray)
    if invert == "yes":
        gray = 1.0 - gray
        notes.append("inverted (invert=yes)")
    elif invert == "auto" and border > 0.5:
        gray = 1.0 - gray
        notes.append(f"inverted (dark strokes on light background detected: border median {border:.2f})")
    background = float(_border_median(gray))

    if fit == "content":
        out = _fit_content(gray, height, width, background, notes)
    else:
        out = None
    if out is None:
        out = _fit_image(gray, height, width, background, notes)
    out = np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)
    return np.ascontiguousarray(out), notes


def decode_pixels(path) -> np.ndarray:
    """The pixels of one still image file as stored, for datasets (`folder:DIR`): uint8
    (H, W) for a grayscale image, (H, W, 3) for any other. The same guards as `load_image`
    (rules 1 and 2: missing, empty, not an image, truncated or corrupt, animated, decompression
    bomb -> ImageError naming the file) and its EXIF orientation (rule 3); transparency is
    composited over white; 16-bit, 32-bit and floating-point grayscale is scaled to [0, 1] as
    rule 4 says, then to 8 bits. No resizing and no inversion. A colour image whose channels
    are all equal is still returned as (H, W, 3): the caller decides what counts as colour."""
    notes: list[str] = []
    im = _open_verified(path, notes)
    try:
        im = _apply_orientation(im, path, notes)
        mode = im.mode
        if mode.startswith("I") or mode == "F":
            gray = _to_gray(im, path, notes)
            return np.rint(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)
        if mode in _ALPHA_MODES or "transparency" in im.info:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            flat = Image.alpha_composite(white, rgba)
            return np.asarray(flat.convert("L" if mode in ("LA", "La") else "RGB"), dtype=np.uint8)
        if mode == "L":
            return np.asarray(im, dtype=np.uint8)
        if mode == "1":
            return np.asarray(im.convert("L"), dtype=np.uint8)
        try:
            return np.asarray(im if mode == "RGB" else im.convert("RGB"), dtype=np.uint8)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError(f"image {path} has pixel mode {mode}, which cannot be made RGB; re-export it as PNG") from exc
    finally:
        im.close()


def load_rgb_image(path, size: tuple[int, int]) -> tuple[np.ndarray, list[str]]:
    """(float32 (3, H, W) in [0, 1], notes) for a model trained on RGB images: the file decoded
    as decode_pixels does (same guards, orientation, transparency over white), a grayscale
    image repeated into three equal channels, resized (bilinear) to size when it differs. No
    inversion: photos are not MNIST digits."""
    height, width = _check_size(size)
    pixels = decode_pixels(path)
    notes: list[str] = []
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
        notes.append("repeated the grayscale image into three equal channels (the model takes RGB)")
    h, w = pixels.shape[:2]
    if (h, w) != (height, width):
        pixels = np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR))
        notes.append(f"resized {w}x{h} to {width}x{height} (bilinear; aspect ratio "
                     f"{'kept' if abs(w / h - width / height) < 1e-6 else 'not kept'})")
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.float32) / 255.0, notes


def save_labeled_image(array_hw: np.ndarray, label_text: str, path) -> None:
    """Write a PNG of the (H, W) or (H, W, 3) [0, 1] image, upscaled (nearest) so it is readable,
    with the label drawn beneath it on a white band. Written atomically (temp file + fsync +
    os.replace). Raises ImageError when the file cannot be written."""
    arr = np.asarray(array_hw, dtype=np.float64)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"save_labeled_image needs a non-empty (H, W) or (H, W, 3) array, got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=1.0, neginf=0.0)
    pixels = np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    h, w = pixels.shape[:2]
    scale = max(1, math.ceil(224 / max(h, w)))
    picture = Image.fromarray(pixels).resize((w * scale, h * scale), Image.Resampling.NEAREST)

    text = str(label_text)
    font = _label_font()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    try:
        box = measure.multiline_textbbox((0, 0), text, font=font)
    except UnicodeError:  # a bitmap fallback font cannot draw every character
        text = text.encode("ascii", "replace").decode("ascii")
        box = measure.multiline_textbbox((0, 0), text, font=font)
    pad = 8
    text_w, text_h = box[2] - box[0], box[3] - box[1]
    canvas_w = max(picture.width, text_w + 2 * pad)
    canvas = Image.new(picture.mode, (canvas_w, picture.height + text_h + 2 * pad), "white")
    canvas.paste(picture, ((canvas_w - picture.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text(((canvas_w - text_w) // 2 - box[0], picture.height + pad - box[1]), text, fill="black",
                        font=font)

    target = Path(path)
    fd, tmp = None, None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent if str(target.parent) else ".")
        with os.fdopen(fd, "wb") as fh:
            fd = None
            canvas.save(fh, format="PNG")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        tmp = None
    except OSError as exc:
        raise ImageError(f"cannot write labeled image {path}: {exc.strerror or exc}; check that its folder exists and is writable") from exc
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------- opening


def _check_size(size) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in size)
        ok = all(int(v) == v for v in size)
    except (TypeError, ValueError):
        ok = False
    if not ok or height < 1 or width < 1:
        raise ValueError(f"size must be two positive integers (H, W), got {size!r}")
    return height, width


def _open_verified(path, notes: list[str]) -> Image.Image:
    """Open `path`, refuse bombs from the header alone, verify(), reopen and decode."""
    p = Path(path)
    if not p.exists():
        raise ImageError(f"image {path} does not exist; check the path")
    if p.is_dir():
        raise ImageError(f"image {path} is a directory; give an image file")
    try:
        with open(p, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                raise ImageError(f"image {path} is empty (0 bytes); give a PNG or JPEG file")
            im = _open_header(fh, path)  # bomb checks happen here, before any decoding
            try:
                im.verify()
            except Exception as exc:  # Pillow raises many types for corrupt data
                raise _corrupt(path, exc) from exc
            fh.seek(0)
            im = _open_header(fh, path)
            frames = getattr(im, "n_frames", 1)
            if frames > 1:
                if im.format == "MPO":
                    notes.append(f"used the first of {frames} pictures in the MPO file")
                else:
                    raise ImageError(
                        f"image {path} is animated or has {frames} frames ({im.format}); "
                        "export the single frame you want as PNG"
                    )
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("error", Image.DecompressionBombWarning)
                    im.load()
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _bomb(path, im.size, exc) from exc
            except MemoryError:
                raise
            except Exception as exc:
                raise _corrupt(path, exc) from exc
            _check_pixels(path, im.size)  # a few formats only know their size after load
            return im
    except PermissionError as exc:
        raise ImageError(f"cannot read image {path}: permission denied") from exc
    except IsADirectoryError as exc:
        raise ImageError(f"image {path} is a directory; give an image file") from exc
    except OSError as exc:  # open() itself failed (I/O error, name too long...)
        raise ImageError(f"cannot read image {path}: {exc.strerror or exc}") from exc


def _open_header(fh, path) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(fh)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _bomb(path, None, exc) from exc
    except Image.UnidentifiedImageError as exc:
        raise ImageError(
            f"{path} is not an image Pillow can read; give a PNG or JPEG file (or another single still image)"
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    _check_pixels(path, im.size)
    return im


def _check_pixels(path, size) -> None:
    pixels = max(1, size[0]) * max(1, size[1])
    if pixels > MAX_PIXELS:
        raise ImageError(
            f"image {path} declares {size[0]}x{size[1]} = {pixels:,} pixels, more than the limit of "
            f"{MAX_PIXELS:,} (possible decompression bomb); refused without decoding it. "
            "Downscale it (a digit needs a few hundred pixels a side) and try again"
        )


def _bomb(path, size, exc) -> ImageError:
    what = f"{size[0]}x{size[1]} pixels, " if size else ""
    detail = str(exc).strip() or f"over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} pixels"
    return ImageError(
        f"image {path} is too large ({what}{detail}); possible decompression bomb, refused without decoding it. "
        "Downscale it (a digit needs a few hundred pixels a side) and try again"
    )


def _corrupt(path, exc) -> ImageError:
    detail = str(exc).strip() or type(exc).__name__
    return ImageError(f"image {path} is truncated or corrupt ({detail}); re-export or re-download it")


def _apply_orientation(im: Image.Image, path, notes: list[str]) -> Image.Image:
    try:
        orientation = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF: use the pixels as stored
        return im
    if orientation not in _ORIENTATION_NAMES:
        return im
    try:
        out = ImageOps.exif_transpose(im)
    except Exception as exc:
        raise _corrupt(path, exc) from exc
    notes.append(f"{_ORIENTATION_NAMES[orientation]} per its EXIF orientation tag ({orientation})")
    return out if out is not None else im


# --------------------------------------------------------------------------- grayscale


def _to_gray(im: Image.Image, path, notes: list[str]) -> np.ndarray:
    """Float (H, W) in [0, 1], alpha composited over white."""
    mode = im.mode
    if mode.startswith("I;16"):
        bits = _declared_bits(im, default=16)
        scale = float(2**bits - 1)
        arr = np.asarray(im).astype(np.float64)
        if arr.size and arr.max() > scale:  # values beyond the declared depth: trust the data
            bits, scale = 16, 65535.0
        notes.append(f"scaled {bits}-bit grayscale ({mode}) to [0, 1] by {int(scale)}")
        return (arr / scale).astype(np.float32)
    if mode == "I":
        arr = np.asarray(im).astype(np.float64)
        bits = _declared_bits(im, default=16 if im.format in ("PNG", "PPM") else None)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if bits is not None and bits <= 16 and lo >= 0 and hi <= 2**bits - 1:
            notes.append(f"scaled {bits}-bit grayscale (I) to [0, 1] by {2**bits - 1}")
            return (arr / (2**bits - 1)).astype(np.float32)
        if bits is None and lo >= 0 and hi <= 65535:
            notes.append("scaled 16-bit grayscale (I) to [0, 1] by 65535")
            return (arr / 65535.0).astype(np.float32)
        notes.append(f"stretched 32-bit integer values {lo:g}..{hi:g} to [0, 1]")
        return _stretch(arr)
    if mode == "F":
        arr = np.asarray(im).astype(np.float64)
        if not np.all(np.isfinite(arr)):
            raise ImageError(f"image {path} contains NaN or infinite values; give a regular 8- or 16-bit image")
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo >= 0.0 and hi <= 1.0:
            notes.append("used floating-point values (F) as they are")
            return arr.astype(np.float32)
        notes.append(f"stretched floating-point values {lo:g}..{hi:g} to [0, 1]")
        return _stretch(arr)

    has_transparency = mode in _ALPHA_MODES or "transparency" in im.info
    if has_transparency:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        gray_im = Image.alpha_composite(white, rgba).convert("L")
        notes.append(f"converted {mode}{'' if mode in _ALPHA_MODES else ' with a transparent colour'} to grayscale over a white background")
    elif mode == "L":
        gray_im = im
    elif mode == "1":
        gray_im = im.convert("L")
        notes.append("converted 1-bit to grayscale")
    elif mode == "P":
        gray_im = im.convert("RGB").convert("L")
        notes.append("converted palette (P) to grayscale")
    elif mode in _COLOR_MODES:
        gray_im = (im if mode == "RGB" else im.convert("RGB")).convert("L")
        notes.append(f"converted {mode} to grayscale" + ("" if mode == "RGB" else " (via RGB)"))
    else:
        try:
            gray_im = im.convert("L")
        except Exception as exc:
            raise ImageError(
                f"image {path} has pixel mode {mode}, which cannot be made grayscale; re-export it as PNG"
            ) from exc
        notes.append(f"converted {mode} to grayscale")
    return np.asarray(gray_im, dtype=np.float32) / np.float32(255.0)


def _declared_bits(im: Image.Image, default):
    """Bits per sample declared by the file (TIFF BitsPerSample), else `default`."""
    tags = getattr(im, "tag_v2", None)
    if tags is not None:
        value = tags.get(258)
        if isinstance(value, (tuple, list)):
            value = value[0] if value else None
        if isinstance(value, int) and 1 <= value <= 32:
            return value
    return default


def _stretch(arr: np.ndarray) -> np.ndarray:
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.float32)
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _border_median(gray: np.ndarray) -> float:
    h, w = gray.shape
    t = max(1, int(round(min(h, w) * BORDER_FRACTION)))
    if 2 * t >= h or 2 * t >= w:
        return float(np.median(gray))
    frame = np.concatenate([gray[:t].ravel(), gray[-t:].ravel(), gray[t:-t, :t].ravel(), gray[t:-t, -t:].ravel()])
    return float(np.median(frame))


# --------------------------------------------------------------------------- sizing


def _resize(gray: np.ndarray, new_w: int, new_h: int) -> np.ndarray:
    if gray.shape == (new_h, new_w):
        return gray
    im = Image.fromarray(np.ascontiguousarray(gray, dtype=np.float32))  # mode "F": no 8-bit rounding
    out = im.resize((new_w, new_h), _LANCZOS, reducing_gap=3.0)
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def _fit_image(gray: np.ndarray, height: int, width: int, background: float, notes: list[str]) -> np.ndarray:
    h, w = gray.shape
    if (h, w) == (height, width):
        return gray
    scale = min(height / h, width / w)
    new_h = min(height, max(1, round(h * scale)))
    new_w = min(width, max(1, round(w * scale)))
    small = _resize(gray, new_w, new_h)
    if (new_h, new_w) == (height, width):
        notes.append(f"resized {w}x{h} -> {width}x{height}")
        return small
    out = np.full((height, width), background, dtype=np.float32)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top:top + new_h, left:left + new_w] = small
    notes.append(
        f"resized {w}x{h} -> {new_w}x{new_h} (aspect kept), padded to {width}x{height} with background {background:.2f}"
    )
    return out


def _fit_content(gray: np.ndarray, height: int, width: int, background: float, notes: list[str]):
    """MNIST-style: crop to content, fit in the central 20/28, center of mass at the center.
    Returns None when no content stands out from the background."""
    peak = float(gray.max())
    if peak - background < MIN_CONTENT_CONTRAST:
        notes.append("no content stands out from the background; fitted the whole image")
        return None
    mask = gray > background + 0.5 * (peak - background)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = gray[r0:r1, c0:c1]
    ch, cw = crop.shape
    box_h = max(1, round(height * CONTENT_FRACTION))
    box_w = max(1, round(width * CONTENT_FRACTION))
    scale = min(box_h / ch, box_w / cw)
    new_h, new_w = min(box_h, max(1, round(ch * scale))), min(box_w, max(1, round(cw * scale)))
    small = _resize(crop, new_w, new_h)

    weights = np.clip(small.astype(np.float64) - background, 0.0, None)
    total = weights.sum()
    if total > 0:
        com_y = float((weights.sum(axis=1) * np.arange(new_h)).sum() / total)
        com_x = float((weights.sum(axis=0) * np.arange(new_w)).sum() / total)
    else:
        com_y, com_x = (new_h - 1) / 2, (new_w - 1) / 2
    top = int(np.clip(math.floor((height - 1) / 2 - com_y + 0.5), 0, height - new_h))
    left = int(np.clip(math.floor((width - 1) / 2 - com_x + 0.5), 0, width - new_w))
    out = np.full((height, width), background, dtype=np.float32)
    out[top:top + new_h, left:left + new_w] = small
    notes.append(f"cropped {gray.shape[1]}x{gray.shape[0]} to its content, {cw}x{ch} at x={c0}, y={r0}")
    notes.append(
        f"resized content {cw}x{ch} -> {new_w}x{new_h} (aspect kept, fits {box_w}x{box_h}), "
        f"placed by center of mass in {width}x{height} padded with background {background:.2f}"
    )
    return out


def _label_font():
    try:
        return ImageFont.load_default(size=20)  # FreeType build of Pillow: a scalable font
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()
