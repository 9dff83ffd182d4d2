import io
import zlib

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


def _photo(width, height, seed=0):
    """A smooth, textured stand-in for a camera photo."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (height // 40, width // 40, 3), np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def test_a_large_jpeg_is_decoded_reduced_and_gives_the_same_features(empty_store):
    from imgsim.featurize import Featurizer, backbone_graph

    data = encode(_photo(3200, 2400), "JPEG", quality=92)
    opened = Image.open(io.BytesIO(data))
    full = np.asarray(center_square(opened.convert("RGB")))  # the exact, full-size decode
    reduced = preprocess(data)
    assert load_rgb(data).size == (400, 300)  # DCT scaling by 1/8, shorter side >= 288
    featurizer = Featurizer(backbone_graph(empty_store)[1])
    a, b = featurizer.run(np.stack([full, reduced]))
    assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.99


def test_exif_orientation_is_applied_after_a_reduced_decode():
    image = _photo(1600, 800)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(image, "JPEG", exif=exif.tobytes())
    assert load_rgb(data).size == (400, 800)  # decoded at 1/2, then turned upright


def test_decoding_beyond_the_memory_allowed_is_refused_before_pixels_are_read():
    png = encode(Image.new("RGB", (2000, 1500)), "PNG")
    with pytest.raises(ImageError, match="the memory setting allows"):
        load_rgb(png, max_decode_bytes=5 << 20)
    jpeg = encode(Image.new("RGB", (2000, 1500)), "JPEG")
    assert load_rgb(jpeg, max_decode_bytes=5 << 20).size == (500, 375)  # reduced: it fits


PEAK = """
import sys
from imgsim.images import preprocess

def peak_kb():  # this process's own high-water mark (ru_maxrss may carry the parent's)
    return int(next(line.split()[1] for line in open("/proc/self/status")
                    if line.startswith("VmHWM")))

data = open(sys.argv[1], "rb").read()
before = peak_kb()
preprocess(data)
print((peak_kb() - before) // 1024)
"""


@pytest.mark.parametrize("mode, fmt, size, bound_mb", [
    ("RGB", "JPEG", (7000, 5700), 40),    # decoded at 1/8: flat in image size
    ("RGB", "PNG", (7000, 5700), 200),    # decoded once (160 MB), reduced before converting
    ("LA", "PNG", (46000, 869), 200),     # a thin strip: its central square kept at once
])
def test_a_40_megapixel_image_stays_under_a_stated_memory_bound(tmp_path, mode, fmt, size,
                                                                bound_mb):
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    small = rng.integers(0, 255, (size[1] // 100 + 1, size[0] // 100 + 1, len(mode)), np.uint8)
    image = Image.fromarray(small, mode).resize(size)
    path = tmp_path / f"big.{fmt.lower()}"
    image.save(path, fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1}))
    del image
    done = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True,
                          text=True, check=True)
    assert int(done.stdout) < bound_mb


def test_formats_outside_the_list_are_not_images_even_named_jpg():
    data = encode(Image.new("RGB", (64, 64), (10, 20, 30)), "ICO")  # Pillow decodes these
    with pytest.raises(ImageError, match="not an image"):       # while merely opening them
        load_rgb(data)


def _repeat_last_scan(data: bytes, times: int) -> bytes:
    start = data.rindex(b"\xff\xda")
    end = data.rindex(b"\xff\xd9")
    return data[:end] + data[start:end] * times + data[end:]


def test_a_jpeg_repeating_its_scans_is_refused_before_decoding():
    progressive = encode(Image.effect_noise((64, 64), 40).convert("RGB"), "JPEG",
                         progressive=True)
    assert load_rgb(progressive).size == (64, 64)  # a real progressive JPEG is fine
    with pytest.raises(ImageError, match="scans is over the limit of 32"):
        load_rgb(_repeat_last_scan(progressive, 100))


def _with_private_chunks(png: bytes, count: int) -> bytes:
    chunk = (0).to_bytes(4, "big") + b"zzZz" + zlib.crc32(b"zzZz").to_bytes(4, "big")
    after_header = 8 + 12 + 13  # the signature and IHDR
    return png[:after_header] + chunk * count + png[after_header:]


def test_a_png_of_a_great_many_chunks_is_refused_before_pillow_walks_them():
    from imgsim.images import MAX_PNG_CHUNKS

    png = encode(Image.new("RGB", (64, 64), "red"), "PNG")
    assert load_rgb(_with_private_chunks(png, 1000)).size == (64, 64)  # skipped: fine
    with pytest.raises(ImageError, match="chunks is over the limit"):
        load_rgb(_with_private_chunks(png, MAX_PNG_CHUNKS))


def test_headers_pillow_would_parse_for_long_are_refused_before_it_does():
    from imgsim.images import MAX_HEADER_PARTS

    jpeg = encode(Image.new("RGB", (64, 64), "red"), "JPEG")
    empty_app5 = b"\xff\xe5\x00\x02"
    assert load_rgb(jpeg[:2] + empty_app5 * 100 + jpeg[2:]).size == (64, 64)
    with pytest.raises(ImageError, match="segments before its image is over the limit"):
        load_rgb(jpeg[:2] + empty_app5 * MAX_HEADER_PARTS + jpeg[2:])
    gif = encode(Image.new("P", (64, 64)), "GIF")
    first_block = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)  # after the table

    def commented(sub_blocks: int) -> bytes:
        comment = b"\x21\xfe" + b"\x01c" * sub_blocks + b"\x00"
        return gif[:first_block] + comment + gif[first_block:]

    assert load_rgb(commented(100)).size == (64, 64)
    with pytest.raises(ImageError, match="blocks before its image is over the limit"):
        load_rgb(commented(MAX_HEADER_PARTS + 1))
    png = encode(Image.new("RGB", (64, 64), "red"), "PNG")
    profile = zlib.compress(b"\0" * (1 << 20))
    body = b"icc\0\0" + profile
    iccp = (len(body).to_bytes(4, "big") + b"iCCP" + body
            + zlib.crc32(b"iCCP" + body).to_bytes(4, "big"))
    with pytest.raises(ImageError, match="more than one colour profile"):
        load_rgb(png[:33] + iccp * 2 + png[33:])


def test_tiffs_and_compressed_bmps_are_not_decoded_and_say_so():
    for compression in ("raw", "jpeg"):  # its layout alone can make opening one costly
        data = encode(Image.new("RGB", (32, 32)), "TIFF", compression=compression)
        with pytest.raises(ImageError, match="TIFF files are not decoded"):
            load_rgb(data)
    assert load_rgb(encode(Image.new("RGB", (32, 32)), "BMP")).size == (32, 32)
    rle = bytearray(encode(Image.new("P", (32, 32)), "BMP"))
    rle[30:34] = (1).to_bytes(4, "little")  # BI_RLE8: decoded by Python code
    with pytest.raises(ImageError, match="run-length compressed BMP"):
        load_rgb(bytes(rle))


def test_an_exif_block_too_large_to_unpack_is_not_read():
    from imgsim.images import MAX_EXIF_BYTES

    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x013C] = "x" * (MAX_EXIF_BYTES + 1)  # HostComputer, padded
    data = encode(Image.new("RGB", (40, 20)), "PNG", exif=exif.tobytes())
    assert load_rgb(data).size == (40, 20)  # not turned: the block was left alone


def test_the_memory_estimate_counts_what_each_format_really_needs():
    from imgsim.images import decode_bytes

    def opened(image, fmt, **kw):
        return Image.open(io.BytesIO(encode(image, fmt, **kw)))

    rgb = Image.new("RGB", (100, 100))
    assert decode_bytes(opened(rgb, "PNG"), (100, 100)) == 100 * 100 * 4
    assert decode_bytes(opened(rgb, "WEBP"), (100, 100)) == 100 * 100 * 16
    palette = rgb.convert("P")
    assert decode_bytes(opened(palette, "PNG", transparency=0), (100, 100)) == 100 * 100 * 12
    progressive = opened(rgb.resize((2000, 1000)), "JPEG", progressive=True)
    progressive.draft("RGB", (500, 250))  # decoded at 1/4, but every coefficient is kept
    assert decode_bytes(progressive, (2000, 1000)) == 500 * 250 * 4 + 2000 * 1000 * 2 * 3


def test_a_part_reaching_outside_the_image_is_refused():
    from imgsim.images import _check_layout

    class Declared:  # what Pillow reports for a TIFF declaring 64 x 64 with a huge tile
        size, format = (64, 64), "TIFF"
        tile = [("packbits", (0, 0, 16384, 16384), 8, ("RGB",))]

    with pytest.raises(ImageError, match="reaches outside the 64x64 image"):
        _check_layout(Declared(), b"")
