import io

import numpy as np
import pytest
from PIL import Image

from imgsim.images import ImageError, center_square, load_rgb, preprocess


def encode(image, fmt="PNG", **kw):
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 20, 30))
    rgb = np.asarray(load_rgb(encode(image)))
    assert rgb.shape == (30, 40, 3)
    assert rgb[5, 30].tolist() == [255, 255, 255]
    assert rgb[5, 5].tolist() == [0, 0, 255]


def test_palette_with_transparency_is_composited():
    image = Image.new("P", (10, 10), 1)
    image.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    image.info["transparency"] = 1
    assert np.asarray(load_rgb(encode(image, transparency=1)))[0, 0].tolist() == [255, 255, 255]


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    array = np.full((8, 8), 32768, dtype=np.uint16)
    rgb = np.asarray(load_rgb(encode(Image.fromarray(array))))
    assert rgb.shape == (8, 8, 3)
    assert 126 <= rgb[0, 0, 0] <= 129  # half of full scale, not saturated white


@pytest.mark.parametrize("mode", ["L", "CMYK", "LA", "1"])
def test_other_modes_convert_to_rgb(mode):
    image = Image.new("RGB", (16, 16), (120, 60, 30)).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert load_rgb(encode(image, fmt)).mode == "RGB"


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    data = encode(image, "JPEG", exif=exif.tobytes())
    assert load_rgb(data).size == (20, 40)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"plain text, not pixels", "not an image"),
])
def test_unusable_bytes_raise_image_error(data, reason):
    with pytest.raises(ImageError, match=reason):
        load_rgb(data)


def test_truncated_jpeg_raises_image_error():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageError, match="cannot decode"):
        load_rgb(data[: len(data) // 2])


def test_pixel_limit_is_enforced_before_decoding():
    data = encode(Image.new("RGB", (300, 300)))
    with pytest.raises(ImageError, match="over the limit"):
        load_rgb(data, max_pixels=50_000)


def test_center_square_keeps_the_middle():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    image.paste((0, 0, 255), (100, 0, 200, 100))  # blue middle third
    square = np.asarray(center_square(image, 224))
    assert square.shape == (224, 224, 3)
    assert square[112, 112].tolist() == [0, 0, 255]


def test_preprocess_gives_the_central_square_as_uint8_pixels():
    data = encode(Image.new("RGB", (50, 80), (127, 255, 0)))
    pixels = preprocess(data)
    assert pixels.shape == (288, 288, 3) and pixels.dtype == np.uint8
    assert pixels[100, 100].tolist() == [127, 255, 0]
