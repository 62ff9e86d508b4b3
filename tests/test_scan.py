"""Pre-flight scan: unreadable files with reasons, in order; duplicates."""

import logging
import shutil

import pytest
from imagezoo import make_class_tree, write_bad_file_zoo, write_image, write_photo_jpeg

from imgcls.data.decode import ImageError, open_image
from imgcls.data.scan import check_image, find_duplicates, scan_paths


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    tree = make_class_tree(root / "tree", {"a": 6, "b": 6}, seed=3)
    zoo = write_bad_file_zoo(root / "zoo")
    good = [p for paths in tree.values() for p in paths]
    return good, zoo


def test_check_image_agrees_with_open_image(folder):
    good, zoo = folder
    for path in good:
        assert check_image(path) is None
    for name, entry in zoo.items():
        reason = check_image(entry.path)
        if entry.reason is None:
            assert reason is None, (name, reason)
            open_image(entry.path)
        else:
            assert reason is not None and reason.startswith(entry.reason), (name, reason)
            with pytest.raises(ImageError):
                open_image(entry.path)


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_scan_paths_finds_exactly_the_bad_files_in_order(folder, workers):
    good, zoo = folder
    paths = [p for pair in zip(good, [e.path for e in zoo.values()]) for p in pair]
    paths += good[len(zoo):] + [e.path for e in list(zoo.values())[len(good):]]
    bad = scan_paths([str(p) for p in paths], workers=workers)
    expected = [(e.path, e.reason) for e in sorted(zoo.values(), key=lambda e: paths.index(e.path)) if e.reason]
    assert [p for p, _ in bad] == [p for p, _ in expected]
    for (_, got), (_, want) in zip(bad, expected):
        assert got.startswith(want)


def test_scan_reports_missing_files(tmp_path):
    assert scan_paths([tmp_path / "gone.jpg"]) == [(tmp_path / "gone.jpg", "file not found")]


def test_scan_catches_a_truncated_camera_jpeg(tmp_path):
    # a large JPEG is checked at 1/8 scale; cutting off its last tenth must still be seen
    path = write_photo_jpeg(tmp_path / "big.jpg", (2048, 1536))
    assert check_image(path) is None
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 9 // 10])
    assert check_image(path) == "truncated image"


def test_scan_progress_bar(folder, caplog):
    """Not on a terminal (pytest captures stderr), the bar is one log line when the scan ends."""
    good, _ = folder
    caplog.set_level(logging.INFO, logger="imgcls")
    assert scan_paths(good, workers=2, progress=True) == []
    lines = [r.getMessage() for r in caplog.records if r.name == "imgcls"]
    assert any(line.startswith("scan") and f"{len(good)}/{len(good)}" in line for line in lines), lines


def test_find_duplicates(tmp_path):
    a = write_image(tmp_path / "a.bmp", color=(10, 20, 30), pattern="noise")
    b = write_image(tmp_path / "b.bmp", color=(10, 20, 30), pattern="noise", seed=1)  # same size, other bytes
    c = write_image(tmp_path / "c.png", color=(200, 20, 30))
    shutil.copy(a, tmp_path / "a_copy.bmp")
    shutil.copy(c, tmp_path / "sub_c.png")
    shutil.copy(a, tmp_path / "a_copy2.bmp")
    assert a.stat().st_size == b.stat().st_size
    paths = [c, a, b, tmp_path / "a_copy.bmp", tmp_path / "missing.png", tmp_path / "sub_c.png",
             tmp_path / "a_copy2.bmp"]
    expected = [[c, tmp_path / "sub_c.png"], [a, tmp_path / "a_copy.bmp", tmp_path / "a_copy2.bmp"]]
    assert find_duplicates(paths) == expected
    assert find_duplicates(paths, workers=0) == expected
    assert find_duplicates([a, b, c]) == []
