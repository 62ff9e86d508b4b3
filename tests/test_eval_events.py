"""imgcls eval --events: capture events scored beside images, checked against a hand computation.

The model is a hand-built ONNX graph whose logits are (mean red, mean blue) / 50, so on solid-colour
images every frame's probabilities are known exactly and the event figures can be computed by hand."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from imgcls import api
from imgcls.cli import main
from imgcls.errors import UserError

LABELS = ["deer", "fox"]
SPEC = '{"input_size": 32, "resize": "squash", "crop_pct": 1.0}'

# event -> (label, frame colours as (red, blue)); each burst has one or more frames that look like the other class
EVENTS = {
    "e1": ("deer", [(200, 60), (200, 60), (80, 180)]),
    "e2": ("fox", [(60, 200), (60, 200), (180, 80)]),
    "e3": ("deer", [(150, 100), (150, 100), (150, 100), (0, 255)]),  # mild deer frames, one glaring fox frame
    "e5": ("fox", [(60, 200), None]),                                  # None: a corrupt file
    "": ("deer", [(200, 60)]),                                         # no group: an event of its own
}


def _model(path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Gather", ["m", "rb"], ["g"], axis=1),
             helper.make_node("Mul", ["g", "scale"], ["logits"])]
    inits = [helper.make_tensor("rb", TensorProto.INT64, [2], [0, 2]),
             helper.make_tensor("scale", TensorProto.FLOAT, [], [1 / 50])]
    graph = helper.make_graph(nodes, "colour",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    for key, value in {"imgcls.labels": json.dumps(LABELS), "imgcls.preprocess": SPEC}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))
    return path


def _data(tmp_path):
    rows = []
    for event, (label, frames) in EVENTS.items():
        for k, colour in enumerate(frames):
            name = f"{event or 'single'}_{k}.png"
            if colour is None:
                (tmp_path / name).write_bytes(b"\x89PNG\r\n\x1a\n broken")
            else:
                red, blue = colour
                Image.new("RGB", (32, 32), (red, 0, blue)).save(tmp_path / name)
            rows.append({"path": name, "label": label, "group": event})
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["path", "label", "group"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _by_hand(how):
    """(event accuracy, per-class recall, confusion, loss), computed here without imgcls."""
    confusion = np.zeros((2, 2), int)
    losses = []
    for label, frames in EVENTS.values():
        probs = np.array([_softmax(np.array([r, b]) / 50) for r, b in (c for c in frames if c is not None)])
        agg = probs.mean(0) if how == "mean" else probs.max(0) / probs.max(0).sum()
        truth = LABELS.index(label)
        confusion[truth, agg.argmax()] += 1
        losses.append(-np.log(agg[truth]))
    recall = confusion.diagonal() / confusion.sum(1)
    return confusion.trace() / confusion.sum(), recall, confusion, float(np.mean(losses))


@pytest.fixture
def setup(tmp_path):
    return _model(tmp_path / "colour.onnx"), _data(tmp_path)


def test_events_are_scored_by_their_aggregated_frames(setup, caplog):
    model, data = setup
    with caplog.at_level("WARNING", logger="imgcls"):
        metrics = api.evaluate(model, data, events=True)
    assert "e5_1.png" in caplog.text  # the corrupt frame is reported and left out
    # frames: 12 readable, 3 of them look like the other class
    assert metrics.n == 12 and metrics.accuracy == pytest.approx(9 / 12)
    ev = metrics.events
    assert ev.metrics.n == 5 and ev.frames == 12 and ev.max_frames == 4 and ev.source == "data"
    # the mean of each burst outvotes its odd frames: every event is right
    accuracy, recall, confusion, loss = _by_hand("mean")
    assert accuracy == 1.0 and ev.metrics.accuracy == 1.0
    assert ev.metrics.loss == pytest.approx(loss, rel=1e-5)
    assert [row["recall"] for row in ev.metrics.per_class] == pytest.approx(recall)
    np.testing.assert_array_equal(ev.metrics.confusion, confusion)

    # max: e3's one glaring fox frame outweighs its three mild deer frames
    ev = api.evaluate(model, data, events=True, aggregate="max").events
    accuracy, recall, confusion, loss = _by_hand("max")
    assert accuracy == pytest.approx(0.8) and ev.metrics.accuracy == pytest.approx(accuracy)
    np.testing.assert_array_equal(confusion, [[2, 1], [0, 2]])
    np.testing.assert_array_equal(ev.metrics.confusion, confusion)
    assert [row["recall"] for row in ev.metrics.per_class] == pytest.approx([2 / 3, 1.0])
    assert ev.metrics.balanced_accuracy == pytest.approx((2 / 3 + 1) / 2)
    assert ev.metrics.per_class[1]["precision"] == pytest.approx(2 / 3)
    assert ev.metrics.loss == pytest.approx(loss, rel=1e-5)
    assert api.evaluate(model, data).events is None  # without --events: images only


def test_cli_prints_events_beside_images_and_json_is_a_superset(setup, capsys):
    model, data = setup
    main(["eval", str(model), str(data), "--json"])
    plain = json.loads(capsys.readouterr().out)
    assert plain["accuracy"] == pytest.approx(0.75) and "events" not in plain
    assert {"balanced_accuracy", "per_class"} <= set(plain) and all("recall" in r for r in plain["per_class"])
    main(["eval", str(model), str(data), "--json", "--events", "--aggregate", "max"])
    both = json.loads(capsys.readouterr().out)
    assert set(plain) < set(both)
    assert {k: both[k] for k in plain} == plain
    events = both["events"]
    assert (events["events"], events["n"], events["frames"], events["aggregate"]) == (5, 5, 12, "max")
    assert events["frames_per_event"] == pytest.approx(12 / 5) and events["accuracy"] == pytest.approx(0.8)
    assert events["confusion_matrix"] == [[2, 1], [0, 2]]

    main(["eval", str(model), str(data), "--events"])
    text = capsys.readouterr().out
    images, events = text.split("events: ")
    for part in (images, events):  # accuracy, balanced accuracy and per-class recall for both
        assert "balanced accuracy" in part and "recall" in part and "deer" in part and "fox" in part
    assert events.startswith("5, given by the data") and "the mean of its frames" in events
    assert "accuracy           1.0000  (n=5)" in events


def test_events_from_exif_times_per_camera(tmp_path):
    model = _model(tmp_path / "colour.onnx")
    rows = []
    bursts = [("cam1", "10:00:0", "deer"), ("cam1", "10:20:0", "fox"), ("cam2", "10:00:0", "deer")]
    for camera, start, label in bursts:
        for k in range(3):
            name = f"{camera}_{start.replace(':', '')}{k}.jpg"
            exif = Image.Exif()
            exif.get_ifd(0x8769)[36867] = f"2024:05:01 {start}{k}"
            colour = (200, 0, 60) if label == "deer" else (60, 0, 200)
            Image.new("RGB", (32, 32), colour).save(tmp_path / name, exif=exif)
            rows.append(f"{name},{label},{camera}")
    data = tmp_path / "bursts.csv"
    data.write_text("path,label,camera\n" + "\n".join(rows) + "\n")
    ev = api.evaluate(model, data, events=True).events
    assert (ev.source, ev.metrics.n, ev.max_frames, ev.metrics.accuracy) == ("exif", 3, 3, 1.0)
    # a gap longer than the 20 minutes between cam1's bursts joins them: one event of two classes
    ev = api.evaluate(model, data, events=True, event_gap=3600).events
    assert ev.metrics.n == 2 and ev.max_frames == 6


def test_event_options_are_checked(setup):
    model, data = setup
    with pytest.raises(UserError, match="unknown aggregate 'median'"):
        api.evaluate(model, data, events=True, aggregate="median")
    with pytest.raises(UserError, match="--event-gap 0 is out of range"):
        api.evaluate(model, data, events=True, event_gap=0)
    with pytest.raises(UserError, match="no column 'trigger' for --event-column"):
        api.evaluate(model, data, events=True, event_column="trigger")
    with pytest.raises(SystemExit):  # argparse refuses an aggregate it does not list
        main(["eval", str(model), str(data), "--events", "--aggregate", "median"])
