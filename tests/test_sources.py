"""Data sources -> records, and the errors users get for bad layouts."""

import pytest
from imagezoo import make_class_tree, write_image

from imgcls.data.sources import collect_inputs, load_dataset
from imgcls.data.split import split_records
from imgcls.data.records import Record
from imgcls.errors import UserError


def test_class_tree_without_splits(tmp_path):
    make_class_tree(tmp_path, {"cat": 3, "dog": 2})
    ds = load_dataset(tmp_path)
    assert list(ds.splits) == ["all"]
    assert ds.classes == ["cat", "dog"]
    assert sorted(r.label for r in ds.splits["all"]) == ["cat"] * 3 + ["dog"] * 2


def test_class_tree_with_train_val_test_and_nested_images(tmp_path):
    make_class_tree(tmp_path / "train", {"a": 2, "b": 2})
    make_class_tree(tmp_path / "valid", {"a": 1, "b": 1})
    make_class_tree(tmp_path / "test", {"a": 1, "b": 1})
    write_image(tmp_path / "train" / "a" / "site1" / "deep.png")
    ds = load_dataset(tmp_path)
    assert set(ds.splits) == {"train", "val", "test"}
    assert len(ds.splits["train"]) == 5  # nested image found
    assert len(ds.splits["val"]) == 2


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("empty_class", "holds no images"),
    ("no_classes", "no class folders"),
    ("not_csv", "expected a folder"),
])
def test_layout_errors(tmp_path, case, message):
    target = tmp_path / "data"
    if case == "empty_class":
        make_class_tree(target, {"a": 2})
        (target / "b").mkdir()
    elif case == "no_classes":
        write_image(target / "x.png")
    elif case == "not_csv":
        target = tmp_path / "data.txt"
        target.write_text("x")
    with pytest.raises(UserError, match=message):
        load_dataset(target)


def test_csv_relative_paths_groups_and_missing_columns(tmp_path):
    make_class_tree(tmp_path / "img", {"a": 2, "b": 2})
    rows = ["file,species,group"] + [f"img/{p.parent.name}/{p.name},{p.parent.name},ev{i // 2}"
                                      for i, p in enumerate(sorted((tmp_path / "img").rglob("*.png")))]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "labels.csv", path_column="file", label_column="species")
    records = ds.splits["all"]
    assert all(r.path.exists() for r in records)
    assert {r.group for r in records} == {"ev0", "ev1"}
    with pytest.raises(UserError, match="missing column.*label.*it has file, species, group"):
        load_dataset(tmp_path / "labels.csv")


def test_collect_inputs_files_folders_csv(tmp_path):
    make_class_tree(tmp_path / "f", {"a": 2, "b": 1})
    single = write_image(tmp_path / "one.jpg")
    (tmp_path / "list.csv").write_text("path\none.jpg\n")
    records = collect_inputs([single, tmp_path / "f", tmp_path / "list.csv"])
    assert len(records) == 1 + 3 + 1
    assert records[-1].path == tmp_path / "one.jpg"
    with pytest.raises(UserError, match="no such file"):
        collect_inputs([tmp_path / "nope"])


def test_split_is_stratified_seeded_and_keeps_groups_whole():
    records = [Record(f"{c}{i}.png", c, group=f"{c}-ev{i // 3}") for c in "abc" for i in range(30)]
    train, val = split_records(records, 0.2, seed=1)
    assert len(train) + len(val) == 90
    assert {r.label for r in val} == {"a", "b", "c"}
    train_groups, val_groups = {r.group for r in train}, {r.group for r in val}
    assert not train_groups & val_groups
    assert split_records(records, 0.2, seed=1) == (train, val)
    assert split_records(records, 0.2, seed=2) != (train, val)


def test_split_gives_each_class_a_val_image():
    records = [Record("a1", "a"), Record("a2", "a")] + [Record(f"b{i}", "b") for i in range(50)]
    train, val = split_records(records, 0.1)
    assert sum(r.label == "a" for r in val) == 1
    assert sum(r.label == "a" for r in train) == 1


# --------------------------------------------------------------------------- hostile CSVs


def _both_readers(path):
    """The two CSV readers (labelled data for train, a list of paths for predict): the same loader."""
    for read in (load_dataset, collect_inputs):
        with pytest.raises(UserError) as info:
            read(path) if read is load_dataset else read([path])
        yield str(info.value)


def test_csv_that_is_not_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"path,label\na.png,cat\ncaf\xe9.png,dog\n")
    for message in _both_readers(path):
        assert message.startswith(f"{path}:3: not UTF-8 text") and "UTF-8" in message


def test_csv_field_over_the_limit_names_file_and_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('path,label\na.png,cat\n"b.png' + "x" * 200_000 + ",dog\n")
    for message in _both_readers(path):
        assert message.startswith(f"{path}:3: a field is longer than") and "quote" in message


@pytest.mark.parametrize("delimiter", [";", "\t", "|"])
def test_csv_delimiter_is_detected(tmp_path, delimiter):
    make_class_tree(tmp_path / "img", {"a": 2, "b": 2})
    files = sorted((tmp_path / "img").rglob("*.png"))
    lines = [f"path{delimiter}label"] + [f"img/{p.parent.name}/{p.name}{delimiter}{p.parent.name}" for p in files]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    ds = load_dataset(tmp_path / "labels.csv")
    assert sorted(r.path for r in ds.splits["all"]) == files and ds.classes == ["a", "b"]
    assert [r.path for r in collect_inputs([tmp_path / "labels.csv"])] == files


def test_unknown_split_values_are_named(tmp_path):
    make_class_tree(tmp_path / "img", {"a": 2, "b": 2})
    files = sorted((tmp_path / "img").rglob("*.png"))
    splits = ["train", "holdout", "dev", "train"]
    rows = ["path,label,split"] + [f"img/{p.parent.name}/{p.name},{p.parent.name},{s}" for p, s in zip(files, splits)]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(UserError, match=r"labels.csv:3: unknown split value\(s\) dev, holdout .*train, val or test"):
        load_dataset(tmp_path / "labels.csv")
