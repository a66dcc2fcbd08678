"""cnnlab.images: turning user pictures into MNIST-style model input, and refusing bad files.
Every image is generated here, in tmp_path, with Pillow (or by hand for crafted headers)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cnnlab import images
from cnnlab.errors import CnnlabError, ImageError
from cnnlab.images import load_image, save_labeled_image


def paper_digit(w=28, h=28, value=0, background=255) -> np.ndarray:
    """A dark vertical bar ('1') on a light page, as a photo of paper would be."""
    a = np.full((h, w), background, np.uint8)
    a[h // 5: h - h // 5, w // 2 - max(1, w // 14): w // 2 + max(1, w // 14)] = value
    return a


def save(img: Image.Image, path: Path, **kw) -> Path:
    img.save(path, **kw)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def forbid_decoding(monkeypatch):
    """Make any pixel decoding fail loudly, to prove a refusal came from the header alone."""
    def boom(self, *a, **k):
        raise AssertionError("pixels were decoded")
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)


# ------------------------------------------------------------------ polarity, shape, range


def test_dark_stroke_on_white_is_auto_inverted(tmp_path):
    src = paper_digit()
    x, notes = load_image(save(Image.fromarray(src), tmp_path / "d.png"), (28, 28))
    assert x.shape == (28, 28) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    stroke = src == 0
    assert np.all(x[stroke] == 1.0) and np.all(x[~stroke] == 0.0)
    assert any("inverted" in n and "dark strokes on light background" in n for n in notes)


def test_light_on_dark_is_kept_by_auto(tmp_path):
    src = 255 - paper_digit()
    x, notes = load_image(save(Image.fromarray(src), tmp_path / "d.png"), (28, 28))
    np.testing.assert_array_equal(x, src / np.float32(255))
    assert not any("inverted" in n for n in notes)


def test_invert_yes_and_no(tmp_path):
    src = 255 - paper_digit()
    p = save(Image.fromarray(src), tmp_path / "d.png")
    yes, notes = load_image(p, (28, 28), invert="yes")
    no, _ = load_image(p, (28, 28), invert="no")
    np.testing.assert_allclose(yes, 1.0 - no)
    assert notes == ["inverted (invert=yes)"]
    paper = save(Image.fromarray(paper_digit()), tmp_path / "paper.png")
    kept, _ = load_image(paper, (28, 28), invert="no")
    assert kept[0, 0] == 1.0  # white page stays white when told not to invert


@pytest.mark.parametrize("bad", ["maybe", "", True, None, "YES"])
def test_invalid_invert_is_image_error(tmp_path, bad):
    p = save(Image.fromarray(paper_digit()), tmp_path / "d.png")
    with pytest.raises(ImageError, match="invert"):
        load_image(p, (28, 28), invert=bad)


def test_invalid_fit_is_image_error(tmp_path):
    p = save(Image.fromarray(paper_digit()), tmp_path / "d.png")
    with pytest.raises(ImageError, match="fit"):
        load_image(p, (28, 28), fit="stretch")


def test_target_size_is_any_hw(tmp_path):
    p = save(Image.fromarray(paper_digit(50, 50)), tmp_path / "d.png")
    for size in [(16, 16), (28, 28), (32, 20), (7, 40)]:
        x, _ = load_image(p, size)
        assert x.shape == size and x.dtype == np.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert x.flags.c_contiguous


def test_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(123, 77, 3), dtype=np.uint8)
    p = save(Image.fromarray(a), tmp_path / "noise.png")
    for fit in ("image", "content"):
        x1, n1 = load_image(p, (28, 28), fit=fit)
        x2, n2 = load_image(p, (28, 28), fit=fit)
        assert x1.tobytes() == x2.tobytes() and n1 == n2


# ------------------------------------------------------------------ modes


def test_16bit_png_uses_full_range_not_clipping(tmp_path):
    ramp = np.linspace(0, 65535, 28 * 28).round().astype(np.uint16).reshape(28, 28)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    p = save(img, tmp_path / "ramp16.png")
    x, notes = load_image(p, (28, 28), invert="no")
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x, ramp / 65535.0, atol=1e-6)
    # mid-gray stays mid-gray (convert("L") would clip everything above 255 to white)
    assert 0.45 < float(np.median(x)) < 0.55
    assert any("16-bit" in n and "65535" in n for n in notes)


def test_16bit_pgm_read_as_mode_i(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=">u2")
    p = tmp_path / "g.pgm"
    p.write_bytes(b"P5\n4 1\n65535\n" + values.tobytes())
    with Image.open(p) as img:
        assert img.mode == "I"
    x, notes = load_image(p, (1, 4), invert="no")
    np.testing.assert_allclose(x[0], values[0] / 65535.0, atol=1e-6)
    assert any("16-bit" in n for n in notes)


def tiff12(values: np.ndarray) -> bytes:
    """A minimal uncompressed grayscale TIFF with 12-bit packed samples (as scientific cameras write)."""
    h, w = values.shape
    data = bytearray()
    for a, b in values.reshape(-1, 2).tolist():  # two 12-bit samples in three bytes, MSB first
        data += bytes([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF])
    tags = [(256, 3, w), (257, 3, h), (258, 3, 12), (259, 3, 1), (262, 3, 1),
            (273, 4, 0), (277, 3, 1), (278, 3, h), (279, 4, len(data))]
    data_offset = 8 + 2 + 12 * len(tags) + 4
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(tags)))
    for tag, typ, val in tags:
        val = data_offset if tag == 273 else val
        out += struct.pack("<HHI", tag, typ, 1) + (struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val))
    return bytes(out + struct.pack("<I", 0) + data)


def test_12bit_tiff_scaled_by_declared_bit_depth(tmp_path):
    ramp = np.linspace(0, 4095, 64).round().astype(np.int64).reshape(8, 8)
    p = tmp_path / "r12.tif"
    p.write_bytes(tiff12(ramp))
    with Image.open(p) as img:
        assert img.mode == "I;16" and img.tag_v2.get(258) in (12, (12,))
    x, notes = load_image(p, (8, 8), invert="no")
    np.testing.assert_allclose(x, ramp / 4095.0, atol=1e-6)  # 4095 is white, not 1/16 gray
    assert any("12-bit" in n and "4095" in n for n in notes)


def test_float_image_used_or_stretched():
    # F images come from TIFF; check the conversion helper directly on an in-memory image
    notes: list[str] = []
    inside = Image.fromarray(np.array([[0.0, 0.25, 1.0]], np.float32))
    np.testing.assert_allclose(images._to_gray(inside, "x", notes), [[0.0, 0.25, 1.0]])
    outside = Image.fromarray(np.array([[-2.0, 0.0, 2.0]], np.float32))
    np.testing.assert_allclose(images._to_gray(outside, "x", notes), [[0.0, 0.5, 1.0]])
    nan = Image.fromarray(np.array([[np.nan, 0.0]], np.float32))
    with pytest.raises(ImageError, match="NaN"):
        images._to_gray(nan, "x", notes)


def test_rgba_transparent_background_becomes_background(tmp_path):
    a = np.zeros((28, 28, 4), np.uint8)  # fully transparent *black*: naive convert("L") sees black
    a[5:23, 12:16] = (0, 0, 0, 255)  # opaque black stroke
    p = save(Image.fromarray(a, "RGBA"), tmp_path / "t.png")
    x, notes = load_image(p, (28, 28))
    assert np.all(x[5:23, 12:16] == 1.0)  # stroke bright
    mask = np.ones((28, 28), bool)
    mask[5:23, 12:16] = False
    assert np.all(x[mask] == 0.0)  # transparency -> white -> inverted to black
    assert "converted RGBA to grayscale over a white background" in notes


def test_half_transparent_la_is_composited(tmp_path):
    a = np.zeros((10, 10, 2), np.uint8)
    a[..., 1] = 128  # black at ~50% alpha over white -> ~0.5 gray
    p = save(Image.fromarray(a, "LA"), tmp_path / "la.png")
    x, notes = load_image(p, (10, 10), invert="no")
    assert np.allclose(x, 127 / 255, atol=2 / 255)
    assert any("LA" in n and "white background" in n for n in notes)


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 0 black (transparent), 1 red
    img.paste(1, (8, 2, 12, 18))
    p = save(img, tmp_path / "p.png", transparency=0)
    x, notes = load_image(p, (20, 20))
    assert x[0, 0] == 0.0  # transparent -> white -> inverted
    red_luma = (255 * 299 // 1000) / 255
    assert np.allclose(x[2:18, 8:12], 1 - red_luma, atol=1 / 255)
    assert any("white background" in n for n in notes)


def test_palette_gif_and_rgb_and_cmyk_and_1bit(tmp_path):
    src = paper_digit(30, 30)
    rgb = Image.fromarray(np.stack([src] * 3, -1))
    cases = {
        "p.gif": (rgb.convert("P"), "palette (P)"),
        "rgb.png": (rgb, "converted RGB to grayscale"),
        "cmyk.tif": (rgb.convert("CMYK"), "CMYK"),
        "bw.png": (Image.fromarray(src).convert("1"), "1-bit"),
        "rgb.jpg": (rgb, "converted RGB to grayscale"),
        "cmyk.jpg": (rgb.convert("CMYK"), "converted CMYK to grayscale"),
    }
    for name, (img, expect) in cases.items():
        x, notes = load_image(save(img, tmp_path / name), (30, 30))
        assert any(expect in n for n in notes), (name, notes)
        assert any("inverted" in n for n in notes), name
        stroke = src == 0
        if name.endswith(".jpg"):  # lossy: ringing around the edges
            assert x[stroke].mean() > 0.9 and x[~stroke].mean() < 0.1, name
        else:
            assert np.all(x[stroke] == 1.0) and np.all(x[~stroke] == 0.0), name


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((10, 20), np.uint8)  # stored 20 wide, 10 high
    a[0:2, 0:2] = 255  # marker at stored top-left
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    p = save(img, tmp_path / "o.png", exif=exif)
    x, notes = load_image(p, (20, 10), invert="no")  # displayed: 10 wide, 20 high
    assert x.shape == (20, 10)
    assert np.all(x[0:2, 8:10] == 1.0) and x.sum() == 4  # top-left went to top-right
    assert any("EXIF orientation" in n for n in notes)


# ------------------------------------------------------------------ sizing


def test_non_square_keeps_aspect_and_pads_with_background(tmp_path):
    a = np.full((20, 60), 255, np.uint8)  # 60 wide, 20 high page
    a[9:11, :] = 0  # a full-width horizontal dark line
    x, notes = load_image(save(Image.fromarray(a), tmp_path / "wide.png"), (28, 28))
    assert x.shape == (28, 28)
    # 60x20 fits as 28x9, centered: rows 9..17 hold the image, the rest is padding
    assert np.all(x[:9] == 0.0) and np.all(x[18:] == 0.0)
    line_rows = np.flatnonzero(x.max(axis=1) > 0.5)
    assert line_rows.size and 9 <= line_rows.min() and line_rows.max() <= 17
    # the line still spans the whole width: not cropped, not squeezed
    assert np.all(x[line_rows].max(axis=0) > 0.5)
    assert any("60x20 -> 28x9 (aspect kept), padded to 28x28" in n for n in notes)


def test_pad_uses_background_level_of_gray_page(tmp_path):
    a = np.full((10, 40), 40, np.uint8)  # dark-gray background, light-on-dark already
    a[4:6, 5:35] = 250
    x, _ = load_image(save(Image.fromarray(a), tmp_path / "g.png"), (28, 28))
    assert np.allclose(x[0], 40 / 255, atol=1e-6) and np.allclose(x[-1], 40 / 255, atol=1e-6)


def test_tall_target_shape(tmp_path):
    p = save(Image.fromarray(paper_digit(40, 40)), tmp_path / "sq.png")
    x, notes = load_image(p, (30, 10))
    assert x.shape == (30, 10)
    assert np.all(x[:10] == 0.0) and np.all(x[20:] == 0.0)  # 40x40 -> 10x10, centered in 30 rows
    assert x[10:20].max() > 0.5


def test_exact_size_is_used_as_is(tmp_path):
    a = np.random.default_rng(1).integers(0, 60, (16, 24), dtype=np.uint8)
    x, notes = load_image(save(Image.fromarray(a), tmp_path / "e.png"), (16, 24))
    np.testing.assert_array_equal(x, a / np.float32(255))
    assert notes == []


def test_huge_image_is_downscaled(tmp_path):
    a = np.full((4000, 6000), 255, np.uint8)  # 24 megapixels, under the limit
    a[500:3500, 2800:3200] = 0  # a thick dark bar
    p = save(Image.fromarray(a), tmp_path / "huge.png", compress_level=1)
    x, notes = load_image(p, (28, 28))
    assert x.shape == (28, 28)
    assert x[14, 14] > 0.9 and x[14, 3] < 0.05  # bar bright in the middle, page dark
    assert np.all(x[:4] == 0.0) and np.all(x[-4:] == 0.0)  # 6000x4000 -> 28x19, padded
    assert any("6000x4000 -> 28x19" in n for n in notes)


def test_content_fit_centers_digit_like_mnist(tmp_path):
    a = np.full((480, 640), 255, np.uint8)
    a[20:120, 30:60] = 0  # a small dark bar in the top-left corner of a big page
    x, notes = load_image(save(Image.fromarray(a), tmp_path / "corner.png"), (28, 28), fit="content")
    rows = np.flatnonzero(x.max(axis=1) > 0.5)
    cols = np.flatnonzero(x.max(axis=0) > 0.5)
    assert rows[0] >= 4 and rows[-1] <= 23 and rows.size >= 18  # 100 tall -> 20 rows
    assert 6 <= cols.size <= 7  # 30 wide -> 6 columns: aspect kept
    ys, xs = np.nonzero(x > 0)
    w = x[ys, xs]
    assert abs((ys * w).sum() / w.sum() - 13.5) <= 1 and abs((xs * w).sum() / w.sum() - 13.5) <= 1
    assert any("content" in n for n in notes)
    plain, _ = load_image(tmp_path / "corner.png", (28, 28))  # default: whole page, digit stays small
    assert (plain > 0.5).sum() < (x > 0.5).sum()


def test_content_fit_without_content_falls_back(tmp_path):
    p = save(Image.new("L", (50, 30), 255), tmp_path / "blank.png")
    x, notes = load_image(p, (28, 28), fit="content")
    assert x.shape == (28, 28) and np.all(x == 0.0)
    assert any("no content" in n for n in notes)


# ------------------------------------------------------------------ refusals


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="does not exist") as e:
        load_image(tmp_path / "nope.png", (28, 28))
    assert "nope.png" in str(e.value)


def test_directory_is_refused(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path, (28, 28))


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match="empty") as e:
        load_image(p, (28, 28))
    assert "empty.png" in str(e.value)


def test_text_file_renamed_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n" * 10)
    with pytest.raises(ImageError, match="not an image") as e:
        load_image(p, (28, 28))
    assert "notes.png" in str(e.value)
    assert isinstance(e.value, CnnlabError)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(buf, fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt") as e:
        load_image(p, (28, 28))
    assert p.name in str(e.value)


def test_corrupt_png_crc(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(paper_digit()).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip a byte inside the compressed data: CRC no longer matches
    p = tmp_path / "crc.png"
    p.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(p, (28, 28))


def test_animated_gif_is_refused_single_frame_gif_accepted(tmp_path):
    frames = [Image.fromarray(paper_digit(value=v)) for v in (0, 100, 200)]
    anim = tmp_path / "anim.gif"
    frames[0].save(anim, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(anim) as img:
        assert img.n_frames == 3
    with pytest.raises(ImageError, match="3 frames"):
        load_image(anim, (28, 28))
    x, _ = load_image(save(frames[0], tmp_path / "still.gif"), (28, 28))
    assert x.shape == (28, 28)


def test_decompression_bomb_header_refused_without_decoding(tmp_path, monkeypatch):
    """A real 20000x20000 1-bit PNG, 400 megapixels, that is only a few tens of kB on disk."""
    w = h = 20000
    row = b"\x00" + bytes(w // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    assert len(data) < 200_000
    p = tmp_path / "bomb.png"
    p.write_bytes(data)
    forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match="decompression bomb") as e:
        load_image(p, (28, 28))
    assert "bomb.png" in str(e.value)


def test_our_pixel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    p = save(Image.fromarray(paper_digit(200, 100)), tmp_path / "big.png")  # 20,000 pixels
    monkeypatch.setattr(images, "MAX_PIXELS", 10_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own check disabled: ours still applies
    forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match=r"200x100 = 20,000 pixels, more than the limit of 10,000") as e:
        load_image(p, (28, 28))
    assert "big.png" in str(e.value) and "without decoding" in str(e.value)


def test_pillow_bomb_warning_becomes_refusal(tmp_path, monkeypatch):
    p = save(Image.fromarray(paper_digit(100, 100)), tmp_path / "warn.png")  # 10,000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 8_000)  # Pillow warns above 8,000, errors above 16,000
    forbid_decoding(monkeypatch)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_image(p, (28, 28))


def test_bad_size_is_programming_error(tmp_path):
    p = save(Image.fromarray(paper_digit()), tmp_path / "d.png")
    for bad in [(0, 28), (28,), "28x28", (28.5, 28)]:
        with pytest.raises(ValueError):
            load_image(p, bad)


# ------------------------------------------------------------------ save_labeled_image


def test_save_labeled_image_writes_readable_png(tmp_path):
    x = np.zeros((28, 28), np.float32)
    x[5:23, 12:16] = 1.0
    out = tmp_path / "pred.png"
    out.write_bytes(b"old content")  # replaced atomically
    save_labeled_image(x, "predicted: 1 (97.3%)", out)
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        img.load()
    assert img.format == "PNG" and img.mode == "L"
    scale = 8  # ceil(224 / 28)
    assert img.width == 28 * scale and img.height > 28 * scale
    a = np.asarray(img)
    expected = np.repeat(np.repeat((x * 255).astype(np.uint8), scale, 0), scale, 1)
    np.testing.assert_array_equal(a[: 28 * scale], expected)  # nearest upscale, image on top
    band = a[28 * scale:]
    assert band.max() == 255 and band.min() < 128  # text drawn in a white band beneath
    assert sorted(q.name for q in tmp_path.iterdir()) == ["pred.png"]  # no temp file left


def test_save_labeled_image_small_and_wide_label(tmp_path):
    x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = tmp_path / "w.png"
    save_labeled_image(x, "a rather long label that is wider than the picture — ünïcode", out)
    with Image.open(out) as img:
        assert img.width >= 4 * 56 and img.height > 3 * 56  # scale = ceil(224 / 4) = 56


def test_save_labeled_image_unwritable_dir(tmp_path):
    with pytest.raises(ImageError, match="cannot write"):
        save_labeled_image(np.zeros((28, 28)), "x", tmp_path / "missing" / "p.png")


def test_roundtrip_saved_image_loads_back(tmp_path):
    x, _ = load_image(save(Image.fromarray(paper_digit()), tmp_path / "d.png"), (28, 28))
    out = tmp_path / "labeled.png"
    save_labeled_image(x, "7", out)
    with Image.open(out) as img:
        assert img.size[0] == 224
