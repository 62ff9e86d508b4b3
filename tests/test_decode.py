"""The one image loader: modes, orientation, size limit, failures, reduced-size JPEG decode."""

import os
import pickle
import subprocess
import sys
import time

import numpy as np
import pytest
from imagezoo import (PNG16_VALUES, ZooEntry, png_bytes, write_bad_file_zoo, write_extreme_aspect_png, write_fifo,
                      write_image, write_lying_png, write_photo_jpeg)
from PIL import Image, ImageFile, ImageOps

import imgcls.data.decode as decode
from imgcls.data.decode import ImageError, jpeg_draft_scale, load_uint8, open_image
from imgcls.data.preprocess import Preprocess, resize_and_crop
from imgcls.data.records import IMAGE_SUFFIXES


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, ZooEntry]:
    return write_bad_file_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos as camera-sized JPEGs (q90): 4:3 (1/4-scale decode) and square (1/8)."""
    folder = tmp_path_factory.mktemp("photos")
    return {
        "chelsea": write_photo_jpeg(folder / "chelsea.jpg", (2048, 1536), "chelsea"),
        "astronaut": write_photo_jpeg(folder / "astronaut.jpg", (2048, 2048), "astronaut"),
    }


@pytest.fixture
def no_simplejpeg(monkeypatch):
    monkeypatch.setattr(decode, "_simplejpeg", None)


READABLE = ["ok_jpeg", "ok_png", "ok_webp", "ok_bmp", "ok_gif", "gray_png", "bilevel_png", "palette_png",
            "palette_transparent_png", "rgba_png", "la_png", "cmyk_jpeg", "png16_gray", "png16_rgb",
            "exif_rot6_jpeg", "exif_rot8_jpeg"]
REFUSED = ["truncated_jpeg", "truncated_png", "zero_bytes", "text_as_jpg", "huge_png_header", "heic_as_jpg",
           "broken_jpeg_header"]


def test_zoo_is_complete_and_uses_image_suffixes(zoo):
    assert sorted(zoo) == sorted(READABLE + REFUSED)
    assert all(entry.path.suffix in IMAGE_SUFFIXES for entry in zoo.values())
    assert len({entry.path.name for entry in zoo.values()}) == len(zoo)


@pytest.mark.parametrize("min_size", [None, 1])
@pytest.mark.parametrize("name", READABLE)
def test_readable_zoo_entries_decode_to_expected_rgb(zoo, name, min_size):
    entry = zoo[name]
    image = open_image(entry.path, min_size=min_size)
    assert image.mode == "RGB"
    array = np.asarray(image)
    assert array.dtype == np.uint8
    if min_size is None:
        assert array.shape == entry.expected.shape
        diff = np.abs(array.astype(int) - entry.expected.astype(int)).max()
        assert diff <= entry.atol, f"{name}: max diff {diff} > {entry.atol}"
    else:  # reduced JPEG decode: same orientation, shorter side >= 1, same colours in the block centres
        eh, ew = entry.expected.shape[:2]
        assert (array.shape[0] >= array.shape[1]) == (eh >= ew)
        if name.endswith("jpeg"):
            sy, sx = eh / array.shape[0], ew / array.shape[1]
            for y, x in ((eh // 4, ew // 4), (eh * 3 // 4, ew * 3 // 4), (eh // 4, ew * 3 // 4)):
                got = array[int(y / sy), int(x / sx)].astype(int)
                assert np.abs(got - entry.expected[y, x]).max() <= 12, (name, y, x, got)


@pytest.mark.parametrize("min_size", [None, 1, 256])
@pytest.mark.parametrize("name", REFUSED)
def test_refused_zoo_entries_raise_image_error_with_reason(zoo, name, min_size):
    entry = zoo[name]
    with pytest.raises(ImageError) as info:
        open_image(entry.path, min_size=min_size)
    assert info.value.reason.startswith(entry.reason), info.value.reason
    assert info.value.path == entry.path
    assert str(entry.path) in str(info.value)


def test_sixteen_bit_png_scales_not_clips(zoo):
    gray = np.asarray(open_image(zoo["png16_gray"].path))[0, :, 0]
    assert dict(zip(PNG16_VALUES, gray.tolist())) == {0: 0, 257: 1, 32768: 128, 65535: 255, 25700: 100, 51400: 200}


def test_sixteen_bit_values_round_correctly(tmp_path):
    values = np.arange(0, 65536, 1, dtype=np.uint16).reshape(256, 256)
    Image.fromarray(values).save(tmp_path / "all16.png")
    got = np.asarray(open_image(tmp_path / "all16.png"))[..., 0].astype(int)
    assert np.array_equal(got, np.rint(values / 65535 * 255).astype(int))


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255                     # red ...
    rgba[0, :, 3] = 0                      # ... fully transparent: white
    rgba[1, :, 3] = 255                    # ... opaque: red
    rgba[2:, :, 3] = 128                   # ... half: pink
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(open_image(tmp_path / "a.png")).astype(int)
    assert (got[0] == 255).all()
    assert (got[1] == [255, 0, 0]).all()
    assert np.abs(got[2] - [255, 127, 127]).max() <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("min_size", [None, 16])
def test_exif_orientation_matches_pillow_exif_transpose(tmp_path, orientation, min_size):
    path = write_image(tmp_path / f"o{orientation}.jpg", size=(128, 64), pattern="quadrants",
                       exif_orientation=orientation, quality=95, subsampling=0)
    with Image.open(path) as reference:
        if min_size:
            reference.draft("RGB", (min_size, min_size))
        expected = np.asarray(ImageOps.exif_transpose(reference.convert("RGB")))
    got = np.asarray(open_image(path, min_size=min_size))
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 1
    if min_size:
        assert min(got.shape[:2]) == 16  # 64 / 4: reduced decode did happen


def test_exif_rotation_swaps_dimensions_and_turns_content(zoo):
    for name, turn in (("exif_rot6_jpeg", -1), ("exif_rot8_jpeg", 1)):
        got = np.asarray(open_image(zoo[name].path))
        assert got.shape == (64, 32, 3)  # stored 64 wide x 32 high
        # orientation 6 (clockwise): the stored bottom-left (blue) block is now top-left
        top_left = got[8, 8].astype(int)
        expected = (0, 0, 255) if turn == -1 else (0, 255, 0)
        assert np.abs(top_left - expected).max() <= 8, (name, top_left)


def test_bomb_is_refused_from_the_header_fast(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(100_000, 100_000))
    start = time.perf_counter()
    with pytest.raises(ImageError, match=r"too large: 100000x100000 pixels > limit"):
        open_image(path)
    assert time.perf_counter() - start < 0.5  # 30 GB were never allocated


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    jpg = write_image(tmp_path / "x.jpg", size=(100, 80))
    png = write_image(tmp_path / "x.png", size=(100, 80))
    monkeypatch.setattr(decode, "MAX_PIXELS", 100 * 80 - 1)
    for path in (jpg, png):
        for min_size in (None, 8):
            with pytest.raises(ImageError, match=r"too large: 100x80 pixels > limit 7999"):
                open_image(path, min_size=min_size)
    monkeypatch.setattr(decode, "MAX_PIXELS", 100 * 80)
    assert open_image(png).size == (100, 80)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        open_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="not a file"):
        open_image(tmp_path)


_OPEN_FIFO = (
    "import sys\n"
    "from imgcls.data.decode import ImageError, open_image\n"
    "try:\n"
    "    open_image(sys.argv[1])\n"
    "except ImageError as err:\n"
    "    print(err.reason)\n"
)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX named pipes")
def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = write_fifo(tmp_path / "pipe.jpg")
    # in a child with a timeout: a plain open() of a FIFO blocks until a writer appears, for ever
    proc = subprocess.run([sys.executable, "-c", _OPEN_FIFO, str(fifo)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "not a regular file (a FIFO)"


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_a_device_is_refused(tmp_path):
    with pytest.raises(ImageError, match=r"not a regular file \(a character device\)"):
        open_image("/dev/zero")  # would otherwise read for ever


@pytest.mark.parametrize("size", [(1, 2_000_000), (100_000, 1), (1, 100_000)])
@pytest.mark.parametrize("min_size", [None, 1, 256])
def test_extreme_aspect_ratios_are_refused_from_the_header(tmp_path, size, min_size):
    path = write_extreme_aspect_png(tmp_path / "x.png", *size)
    assert path.stat().st_size < 8192  # a tiny file; the shorter-side resize would need gigabytes
    with pytest.raises(ImageError, match=rf"extreme aspect ratio: {size[0]}x{size[1]} pixels"):
        open_image(path, min_size=min_size)
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        load_uint8(path, Preprocess(input_size=224))
    lying = write_lying_png(tmp_path / "lying.png", *size)  # the header alone decides: no pixels are read
    with pytest.raises(ImageError, match="extreme aspect ratio"):
        open_image(lying, min_size=min_size)


def test_the_resized_size_is_bounded_as_well(tmp_path, monkeypatch):
    path = write_image(tmp_path / "strip.png", size=(50, 1000))  # 1:20, fine by aspect
    assert open_image(path, min_size=256).size == (50, 1000)
    monkeypatch.setattr(decode, "MAX_RESIZED_PIXELS", 256 * 5120 - 1)  # resized: 256 x 5120
    with pytest.raises(ImageError, match=r"would be 256x5120 once resized to a shorter side of 256"):
        open_image(path, min_size=256)
    assert open_image(path).size == (50, 1000)  # no resize asked for: nothing to bound


def test_image_error_pickles_for_process_pools(tmp_path):
    err = pickle.loads(pickle.dumps(ImageError("zero bytes", tmp_path / "a.jpg")))
    assert err.reason == "zero bytes" and err.path == tmp_path / "a.jpg"
    assert str(err) == f"{tmp_path / 'a.jpg'}: zero bytes"


def test_truncation_is_not_papered_over(zoo, monkeypatch):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # we never switch it on
    monkeypatch.setattr(decode, "_simplejpeg", None)  # Pillow path alone detects it too
    with pytest.raises(ImageError, match="truncated image"):
        open_image(zoo["truncated_jpeg"].path, min_size=8)


def test_draft_scale_rule():
    assert jpeg_draft_scale((2048, 1536), 256) == 4     # 1536 / 4 = 384 >= 256, / 8 = 192 < 256
    assert jpeg_draft_scale((2048, 2048), 256) == 8
    assert jpeg_draft_scale((500, 300), 256) == 1
    assert jpeg_draft_scale((600, 600), 256) == 2
    assert jpeg_draft_scale((4000, 3000), 1) == 8


def test_reduced_decode_is_reduced_and_keeps_min_size(photos):
    assert open_image(photos["chelsea"]).size == (2048, 1536)
    assert open_image(photos["chelsea"], min_size=256).size == (512, 384)
    assert open_image(photos["chelsea"], min_size=400).size == (1024, 768)
    assert open_image(photos["chelsea"], min_size=1000).size == (2048, 1536)
    assert open_image(photos["astronaut"], min_size=256).size == (256, 256)


@pytest.mark.parametrize("name", ["chelsea", "astronaut"])
def test_load_uint8_reduced_path_matches_full_decode(photos, name, record_property):
    spec = Preprocess()  # 224, shorter side 256
    fast = load_uint8(photos[name], spec)
    full = resize_and_crop(open_image(photos[name]), spec)
    assert fast.shape == full.shape == (3, 224, 224) and fast.dtype == np.uint8
    diff = np.abs(fast.astype(int) - full.astype(int))
    record_property("mean_abs_diff", float(diff.mean()))
    record_property("max_abs_diff", int(diff.max()))
    print(f"{name}: reduced vs full decode, mean |diff| {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() < 3.0


@pytest.mark.parametrize("variant", [{}, {"progressive": True}, {"subsampling": 1}, {"mode": "L"},
                                     {"exif_orientation": 6}, {"size": (1001, 757)}])
def test_simplejpeg_and_pillow_paths_give_identical_pixels(tmp_path, monkeypatch, variant):
    size = variant.pop("size", (640, 480))
    path = write_image(tmp_path / "p.jpg", size=size, pattern="noise", quality=90, **variant)
    fast = {m: np.asarray(open_image(path, min_size=m)) for m in (1, 60, 120, 200)}
    monkeypatch.setattr(decode, "_simplejpeg", None)
    for m, array in fast.items():
        pil = np.asarray(open_image(path, min_size=m))
        assert array.shape == pil.shape and min(array.shape[:2]) >= m
        assert np.abs(array.astype(int) - pil).max() <= 1, (variant, m)


def test_simplejpeg_failure_falls_back_to_pillow(photos, monkeypatch):
    class Broken:
        @staticmethod
        def decode_jpeg(*args, **kwargs):
            raise ValueError("quirk")

    expected = np.asarray(open_image(photos["chelsea"], min_size=256))
    monkeypatch.setattr(decode, "_simplejpeg", Broken)
    assert np.array_equal(np.asarray(open_image(photos["chelsea"], min_size=256)), expected)


def test_cmyk_jpeg_with_min_size_uses_pillow(tmp_path):
    cmyk = np.zeros((256, 256, 4), np.uint8)
    cmyk[..., 0] = 255  # cyan
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=95)
    got = np.asarray(open_image(tmp_path / "c.jpg", min_size=32))
    assert got.shape == (32, 32, 3)  # 1/8 scale through Pillow's draft
    assert np.abs(got.astype(int) - [0, 255, 255]).max() <= 10


def test_decode_and_scan_run_without_torch():
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch' or name.startswith('torch.'):\n"
            "            raise ImportError('torch blocked')\n"
            "sys.meta_path.insert(0, Block())\n"
            "import imgcls.data.decode, imgcls.data.scan\n"
            "assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr
