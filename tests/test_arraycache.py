"""The array cache (decode once, reuse every run) and the batched augmentation on tensors."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import imgcls
from conftest import FAST
from imagezoo import make_class_tree
from imgcls.data import arraycache
from imgcls.data.batch_augment import BatchAugment, cutout, pad_crop_flip, resized_crop_boxes
from imgcls.data.dataset import ArrayLoader, ImageDataset
from imgcls.data.preprocess import Augment, Preprocess
from imgcls.data.records import Record

SPEC = Preprocess(input_size=32, resize="squash", crop_pct=1.0, mean=(0.5, 0.25, 0.75), std=(0.2, 0.2, 0.2))


@pytest.fixture
def tree(tmp_path):
    files = make_class_tree(tmp_path / "data", {"a": 6, "b": 6}, size=(32, 32), seed=1)
    return tmp_path / "data", [Record(str(p), label) for label, paths in files.items() for p in paths]


@pytest.fixture
def count_decodes(monkeypatch):
    calls = []
    decode = arraycache.decode_square

    def counted(path, spec, augment):
        calls.append(path)
        return decode(path, spec, augment)

    monkeypatch.setattr(arraycache, "decode_square", counted)
    return calls


def test_cache_is_built_once_and_reused(tree, tmp_path, count_decodes):
    _, records = tree
    first = arraycache.load_or_build(records, SPEC, None, tmp_path / "cache")
    assert len(count_decodes) == len(records) and not first.reused
    assert first.images.shape == (12, 32, 32, 3) and first.images.dtype == np.uint8
    # each row is exactly what prediction decodes (the eval crop), channels last
    from imgcls.data.decode import load_uint8
    assert np.array_equal(first.images[3], load_uint8(records[3].path, SPEC).transpose(1, 2, 0))
    again = arraycache.load_or_build(records, SPEC, None, tmp_path / "cache")
    assert len(count_decodes) == len(records)  # no decode the second time
    assert again.reused and isinstance(again.images, np.memmap)
    assert np.array_equal(np.asarray(again.images), np.asarray(first.images))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.path.name,
                                                                             first.path.stem + ".json"])


def test_under_several_processes_the_first_of_each_machine_decodes_and_the_others_map_its_entry(
        tree, tmp_path, count_decodes, monkeypatch):
    """Local rank 0 decodes before the barrier; every other rank waits at it and then maps the entry
    (it decodes nothing). A rank 0 that cannot write still meets the others at the barrier, then raises."""
    from imgcls.train import distributed, prepare
    _, records = tree
    seen = []  # decodes done when each barrier is reached
    monkeypatch.setattr(distributed, "barrier", lambda: seen.append(len(count_decodes)))
    arrays = {}
    for local in (0, 1):
        monkeypatch.setenv("LOCAL_RANK", str(local))
        arrays[local] = prepare._array_cache(records, SPEC, None, tmp_path / "cache", 2, False, "decode train")
    assert seen == [12, 12] and len(count_decodes) == 12
    assert not arrays[0].reused and arrays[1].reused
    assert np.array_equal(np.asarray(arrays[1].images), np.asarray(arrays[0].images))
    # a later rank waits first: with nothing written by then it decodes after the barrier, not before
    prepare._array_cache(records, SPEC, None, tmp_path / "other", 2, False, "decode train")
    assert seen[-1] == 12 and len(count_decodes) == 24

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prepare, "load_or_build", full_disk)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(OSError, match="No space"):
        prepare._array_cache(records, SPEC, None, tmp_path / "full", 2, False, "decode train")
    assert len(seen) == 4


def test_entries_unused_for_a_month_and_old_temp_files_are_pruned(tree, tmp_path):
    _, records = tree
    folder = tmp_path / "cache"
    old = arraycache.load_or_build(records[:4], SPEC, None, folder)
    kept = arraycache.load_or_build(records[4:], SPEC, None, folder)
    stale_tmp = folder / "abc.123.tmp.npy"
    stale_tmp.write_bytes(b"x")
    month_ago = old.path.stat().st_mtime - 31 * 86400
    for path in (old.path, old.path.with_suffix(".json"), stale_tmp):
        os.utime(path, (month_ago, month_ago))
    arraycache.load_or_build(records[4:], SPEC, None, folder)  # a reuse prunes nothing ...
    assert old.path.exists()
    arraycache.load_or_build(records, SPEC, None, folder)      # ... a build does
    assert not old.path.exists() and not old.path.with_suffix(".json").exists() and not stale_tmp.exists()
    assert kept.path.exists() and arraycache.load_or_build(records[4:], SPEC, None, folder).reused


def test_key_follows_files_and_geometry(tree):
    _, records = tree
    key = arraycache.cache_key(records, SPEC, None)
    assert arraycache.cache_key(list(records), SPEC, None) == key
    assert arraycache.cache_key(records, SPEC, Augment()) != key  # training decode (with its crop margin)
    assert arraycache.cache_key(records, SPEC.replace(input_size=24), None) != key
    assert arraycache.cache_key(records[:-1], SPEC, None) != key
    stat = os.stat(records[0].path)
    os.utime(records[0].path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file "changed"
    assert arraycache.cache_key(records, SPEC, None) != key


def test_interrupted_or_partial_cache_is_not_reused(tree, tmp_path, monkeypatch):
    _, records = tree
    count_decodes = []
    folder = tmp_path / "cache"
    decode = arraycache.decode_square

    def dies_at_the_fifth(path, spec, augment):
        if path == records[5].path:
            raise KeyboardInterrupt
        return decode(path, spec, augment)

    monkeypatch.setattr(arraycache, "decode_square", dies_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        arraycache.load_or_build(records, SPEC, None, folder, workers=1)
    assert list(folder.iterdir()) == []  # nothing left that looks finished, no temp file either

    monkeypatch.undo()
    monkeypatch.setattr(arraycache, "decode_square", lambda *a: count_decodes.append(a[0]) or decode(*a))
    built = arraycache.load_or_build(records, SPEC, None, folder)
    assert len(count_decodes) == len(records) and not built.reused

    # killed between the array's rename and its JSON: the array alone is not trusted
    built.path.with_suffix(".json").unlink()
    assert not arraycache.load_or_build(records, SPEC, None, folder).reused
    assert len(count_decodes) == 2 * len(records)
    # a truncated array beside its JSON is not trusted either
    data = built.path.read_bytes()
    built.path.write_bytes(data[: len(data) // 2])
    assert not arraycache.load_or_build(records, SPEC, None, folder).reused
    assert len(count_decodes) == 3 * len(records)


def test_unreadable_files_are_listed_and_stay_listed_on_reuse(tree, tmp_path):
    root, records = tree
    bad = root / "a" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    records = records + [Record(str(bad), "a")]
    for reused in (False, True):
        cache = arraycache.load_or_build(records, SPEC, None, tmp_path / "cache")
        assert cache.reused is reused
        assert list(cache.failures) == [len(records) - 1] and cache.failures[len(records) - 1]
        view = cache.view()
        assert len(view) == len(records) - 1 and view[0].shape == (3, 32, 32)


def test_pad_crop_flip_is_exact_on_a_hand_made_tensor():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    top, left, flip = torch.tensor([0, 2]), torch.tensor([1, 0]), torch.tensor([False, True])
    out = pad_crop_flip(x, 4, 1, "zero", top, left, flip)
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    want0 = padded[0, :, 0:4, 1:5]
    want1 = padded[1, :, 2:6, 0:4][:, :, ::-1]
    assert out.shape == (2, 3, 4, 4)
    assert np.array_equal(out[0].numpy(), want0) and np.array_equal(out[1].numpy(), want1)
    # the first row of image 0 is the zero border, and its second row the image's first, shifted by 0 columns
    assert out[0, 0, 0].tolist() == [0, 0, 0, 0] and out[0, 0, 1].tolist() == x[0, 0, 0].tolist()
    reflected = pad_crop_flip(x, 4, 2, "reflect", torch.tensor([0, 2]), torch.tensor([4, 2]),
                              torch.tensor([True, False]))
    ref = F.pad(x, (2, 2, 2, 2), mode="reflect")
    assert torch.equal(reflected[0], ref[0, :, 0:4, 4:8].flip(2)) and torch.equal(reflected[1], x[1])
    # by hand: rows 2, 1, 0, 1 of the image (reflected above it), columns 2, 3 then reflected 2, 1, mirrored
    assert reflected[0, 0].tolist() == [[9, 10, 11, 10], [5, 6, 7, 6], [1, 2, 3, 2], [5, 6, 7, 6]]


def test_cutout_and_resized_crop_boxes():
    x = torch.full((2, 3, 6, 6), 9.0)
    fill = torch.tensor([1.0, 2.0, 3.0])
    out = cutout(x, 2, fill, torch.tensor([0, 3]), torch.tensor([0, 3]))
    # image 0: centred at a corner, clipped to one pixel; image 1: the 2x2 square at rows/cols 2-3
    assert (out[0] != 9).sum() == 3 and out[0, :, 0, 0].tolist() == [1, 2, 3]
    assert (out[1, 0] != 9).nonzero().tolist() == [[2, 2], [2, 3], [3, 2], [3, 3]]
    boxes = resized_crop_boxes(500, 20, 30, (0.08, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 30).all() and (boxes[:, 3] <= 20).all()
    area = w * h / 600
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert ((w >= 3 / 4 * h - 1) & (w <= 4 / 3 * h + 1)).all()  # the ratio range, up to the rounding to pixels
    assert area.std() > 0.1 and (boxes[:, 0] > 0).any() and (boxes[:, 1] > 0).any()  # spread, not one box


@pytest.mark.parametrize("augment", [Augment(crop_padding=4, cutout=8, color_jitter=0.3),
                                     Augment(crop_scale=(0.35, 1.0), color_jitter=0.0)])
def test_batch_augment_shapes_types_and_reproducibility(augment):
    x = torch.randint(0, 256, (5, 3, 36, 36), dtype=torch.uint8)
    spec = SPEC
    out = BatchAugment(spec, augment)(x, torch.Generator().manual_seed(3))
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    again = BatchAugment(spec, augment)(x, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # the epoch's generator decides everything


def test_array_loader_batches_like_a_dataloader(tree, tmp_path):
    _, records = tree
    cache = arraycache.load_or_build(records, SPEC, Augment(), tmp_path / "cache")
    index = {"a": 0, "b": 1}
    plain = ImageDataset(records, index, SPEC, None, cache.view())
    batches = list(ArrayLoader(plain, 5))
    assert [len(y) for _, y in batches] == [5, 5, 2]
    images = torch.cat([x for x, _ in batches])
    assert images.dtype == torch.uint8 and torch.equal(images[7], torch.from_numpy(plain.cache[7]))
    assert torch.cat([y for _, y in batches]).tolist() == plain.targets
    train = ImageDataset(records, index, SPEC, Augment(crop_padding=2), cache.view())
    loader = ArrayLoader(train, 5, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True)
    got = list(loader)
    assert len(loader) == len(got) == 2 and all(x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
                                                for x, _ in got)
    drawn = ArrayLoader(train, 4, sampler=[0, 0, 11, 11], generator=torch.Generator())
    assert next(iter(drawn))[1].tolist() == [0, 0, 1, 1]


def test_training_on_the_array_cache_learns_and_reuses_it(tiny_tree, tmp_path, count_decodes):
    data = tmp_path / "data"
    shutil.copytree(tiny_tree, data)
    (data / "cat" / "broken.png").write_bytes(b"not an image")
    options = {**FAST, "cache_dir": str(tmp_path / "cache"),
               "augment": {**Augment().to_dict(), "crop_padding": 2, "color_jitter": 0.0}}
    first = imgcls.train(data, tmp_path / "one", epochs=4, progress=False, **options)
    scan = json.loads((first.run_dir / "scan.json").read_text())
    assert scan["cache"] == "array" and not scan["array_cache"]["train"]["reused"]
    assert [u["path"] for u in scan["unreadable"]] == [str(data / "cat" / "broken.png")]
    assert first.summary["val_accuracy"] >= 0.9
    decoded = len(count_decodes)
    assert decoded == 49
    second = imgcls.train(data, tmp_path / "two", epochs=1, progress=False, **options)
    assert len(count_decodes) == decoded  # the second run decodes nothing
    scan = json.loads((second.run_dir / "scan.json").read_text())
    assert scan["array_cache"]["train"]["reused"] and scan["array_cache"]["val"]["reused"]
    assert [u["path"] for u in scan["unreadable"]] == [str(data / "cat" / "broken.png")]
