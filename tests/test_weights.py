"""Local weight files (--weights PATH): formats, prefixes, key matching, reports."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from imgcls.errors import UserError
from imgcls.models.classifier import Classifier
from imgcls.data.preprocess import Preprocess
from imgcls.models.weights import LoadReport, apply_state_dict, load_weights_file, read_state_dict


class Tiny(nn.Module):
    def __init__(self, num_classes: int = 3, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def _trained_like(seed: int = 0, num_classes: int = 3) -> Tiny:
    torch.manual_seed(seed)
    net = Tiny(num_classes)
    with torch.no_grad():  # non-default BN statistics, so a wrong copy shows
        for bn in (net.bn1, net.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    return net


def _assert_same(a: dict, b: dict, keys=None):
    for key in keys if keys is not None else a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- formats


def _write(fmt: str, tmp_path, sd: dict):
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path), metadata={"model": "tiny"})
    elif fmt == "pth":
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    elif fmt == "checkpoint_state_dict":
        path = tmp_path / "ckpt.pth"
        torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, path)
    elif fmt == "checkpoint_model":
        path = tmp_path / "ckpt.pt"
        torch.save({"model": sd, "best_acc": 0.9}, path)
    elif fmt == "checkpoint_model_state":
        path = tmp_path / "ckpt.pt"
        torch.save({"model_state": sd}, path)
    elif fmt == "module_prefix":
        path = tmp_path / "dp.pth"
        torch.save({"module." + k: v for k, v in sd.items()}, path)
    elif fmt == "classifier_wrapper":  # an imgcls Classifier's own state dict: "net." keys
        path = tmp_path / "wrapped.pth"
        torch.save({"state_dict": {"net." + k: v for k, v in sd.items()}}, path)
    elif fmt in ("run_dir", "run_dir_file"):
        run = tmp_path / "run"
        run.mkdir()
        save_file(sd, str(run / "model.safetensors"), metadata={"labels": json.dumps(["a", "b", "c"])})
        (run / "labels.json").write_text('["a", "b", "c"]')
        path = run if fmt == "run_dir" else run / "model.safetensors"
    else:  # pragma: no cover
        raise AssertionError(fmt)
    return path


@pytest.mark.parametrize("fmt", [
    "safetensors", "pth", "checkpoint_state_dict", "checkpoint_model", "checkpoint_model_state",
    "module_prefix", "classifier_wrapper", "run_dir", "run_dir_file",
])
def test_formats_load_every_tensor(fmt, tmp_path):
    source = _trained_like(seed=0).state_dict()
    path = _write(fmt, tmp_path, source)
    net = _trained_like(seed=1)
    report = load_weights_file(path, net)
    assert isinstance(report, LoadReport)
    assert report.ok and not report.head_replaced, report.summary()
    assert report.loaded == list(source)
    _assert_same(source, net.state_dict())
    assert "every key matched" in report.summary()


def test_classifier_state_dict_loads_into_bare_net(tmp_path):
    wrapped = Classifier(_trained_like(seed=0), Preprocess())
    torch.save(wrapped.state_dict(), tmp_path / "c.pt")
    net = _trained_like(seed=1)
    assert load_weights_file(tmp_path / "c.pt", net).ok
    _assert_same(wrapped.net.state_dict(), net.state_dict())


def test_bare_net_file_loads_into_wrapped_net(tmp_path):
    source = _trained_like(seed=0).state_dict()
    save_file(source, str(tmp_path / "model.safetensors"))
    wrapped = Classifier(_trained_like(seed=1), Preprocess())
    assert load_weights_file(tmp_path, wrapped).ok
    _assert_same(source, wrapped.net.state_dict())


def test_pickled_objects_refused(tmp_path):
    torch.save(_trained_like(), tmp_path / "whole_model.pth")  # a pickled module, not a state dict
    with pytest.raises(UserError, match=r"weights_only=True.*Tiny|Tiny.*weights_only=True"):
        load_weights_file(tmp_path / "whole_model.pth", Tiny())


@pytest.mark.parametrize("name,content,match", [
    ("broken.pth", b"not a torch file", "not a readable PyTorch"),
    ("broken.safetensors", b"\x00\x01garbage", "not a readable safetensors"),
    ("weights.h5", b"", "unknown weight file type"),
])
def test_unreadable_files(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_weights_file(tmp_path / name, Tiny())


def test_missing_path_and_empty_dir(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_weights_file(tmp_path / "nope.pth", Tiny())
    with pytest.raises(UserError, match="without model.safetensors"):
        load_weights_file(tmp_path, Tiny())


def test_checkpoint_without_weights(tmp_path):
    torch.save({"epoch": 1, "lr": 0.1}, tmp_path / "meta.pth")
    with pytest.raises(UserError, match="no model weights found"):
        read_state_dict(tmp_path / "meta.pth")


# --------------------------------------------------------------------------- mismatch reports


def test_mismatch_report_lists_missing_unexpected_and_shapes(tmp_path):
    source = _trained_like(seed=0).state_dict()
    del source["conv2.weight"]                                   # missing
    source["extra.weight"] = torch.zeros(2)                      # unexpected
    source["conv1.weight"] = torch.zeros(4, 3, 3, 3)             # other width
    torch.save(source, tmp_path / "w.pth")
    net = _trained_like(seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    report = load_weights_file(tmp_path / "w.pth", net)
    assert report.missing == ["conv2.weight"]
    assert report.unexpected == ["extra.weight"]
    assert report.shape_mismatch == [("conv1.weight", (4, 3, 3, 3), (8, 3, 3, 3))]
    assert not report.head_replaced and not report.ok
    after = net.state_dict()
    _assert_same(before, after, ["conv1.weight", "conv2.weight"])   # left as initialized
    _assert_same(source, after, ["bn1.weight", "bn2.running_var", "fc.weight", "fc.bias"])
    text = report.summary()
    assert "\n" not in text
    for piece in ("conv2.weight", "extra.weight", "conv1.weight", "[4, 3, 3, 3]", "[8, 3, 3, 3]"):
        assert piece in text


def test_weights_that_do_not_fit(tmp_path):
    other = nn.Sequential(nn.Conv2d(3, 32, 5), nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(10, 3))
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    net = _trained_like(seed=1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(UserError, match=r"weights don't fit model tiny-test: only 0 of \d+") as info:
        load_weights_file(tmp_path / "other.safetensors", net, model_name="tiny-test")
    message = str(info.value)
    assert "missing conv1.weight" in message and "unexpected" in message and "0.weight" in message
    _assert_same(before, net.state_dict())  # nothing half-loaded


def test_head_replaced_when_classes_differ(tmp_path):
    source = _trained_like(seed=0, num_classes=3).state_dict()
    save_file(source, str(tmp_path / "w.safetensors"))
    net = _trained_like(seed=1, num_classes=5)
    fresh_head = net.fc.weight.detach().clone()
    report = load_weights_file(tmp_path / "w.safetensors", net)
    assert report.head_replaced and report.ok
    assert sorted(report.head_keys) == ["fc.bias", "fc.weight"]
    assert "head replaced" in report.summary()
    backbone = [k for k in source if not k.startswith("fc.")]
    _assert_same(source, net.state_dict(), backbone)
    assert net.fc.weight.shape == (5, 16)
    assert torch.equal(net.fc.weight, fresh_head)        # the new, freshly initialized head stays


def test_headless_file_keeps_head_and_old_files_without_bn_counter(tmp_path):
    source = {k: v for k, v in _trained_like(seed=0).state_dict().items()
              if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    torch.save(source, tmp_path / "backbone.pth")
    report = load_weights_file(tmp_path / "backbone.pth", _trained_like(seed=1))
    assert report.head_replaced and report.missing == [] and report.unexpected == []


def test_prefixed_keys_prefer_exact_names():
    # a model whose own keys start with a stripped prefix must still match exactly
    net = nn.Sequential()
    net.add_module("model", nn.Linear(4, 4))
    net.add_module("fc", nn.Linear(4, 2))
    source = {k: torch.full_like(v, 3.0) for k, v in net.state_dict().items()}
    report = apply_state_dict(net, source)
    assert report.ok and report.loaded == list(source)
    assert torch.equal(net.model.weight, torch.full((4, 4), 3.0))


# --------------------------------------------------------------------------- the file's own head


def test_source_head_kept_when_the_head_is_replaced(tmp_path):
    # ImageNet-shaped weights (a 1000-class head) into a 2-class net
    source = _trained_like(seed=0, num_classes=1000).state_dict()
    torch.save({"module." + k: v for k, v in source.items()}, tmp_path / "imagenet.pth")
    net = _trained_like(seed=1, num_classes=2)
    report = load_weights_file(tmp_path / "imagenet.pth", net)
    assert report.head_replaced and report.ok
    weight, bias = report.source_head
    assert weight.shape == (1000, 16) and bias.shape == (1000,)
    assert weight.dtype == bias.dtype == torch.float32 and weight.device.type == "cpu"
    assert torch.equal(weight, source["fc.weight"]) and torch.equal(bias, source["fc.bias"])
    assert net.fc.weight.shape == (2, 16)
    assert "source_head" not in report.to_dict()
    json.dumps(report.to_dict())


def test_source_head_of_a_registry_net_and_when_absent():
    from imgcls.models.registry import create_model

    torch.manual_seed(0)
    source = create_model("cifarnet", 1000).state_dict()  # declared head: classifier.5
    report = apply_state_dict(create_model("cifarnet", 2), source)
    assert report.head_replaced
    assert torch.equal(report.source_head[0], source["classifier.5.weight"])
    assert torch.equal(report.source_head[1], source["classifier.5.bias"])
    assert report.source_head[0].data_ptr() != source["classifier.5.weight"].data_ptr()  # a copy

    same = _trained_like(seed=0).state_dict()  # same class count: the loaded head itself
    net = _trained_like(seed=1)
    report = apply_state_dict(net, same)
    assert not report.head_replaced and torch.equal(report.source_head[0], net.fc.weight)

    headless = {k: v for k, v in same.items() if not k.startswith("fc.")}
    assert apply_state_dict(_trained_like(seed=1), headless).source_head is None
    other_input = dict(same, **{"fc.weight": torch.zeros(1000, 8), "fc.bias": torch.zeros(1000)})
    assert apply_state_dict(_trained_like(seed=1), other_input).source_head is None
    no_bias = {k: v for k, v in same.items() if k != "fc.bias"}
    assert apply_state_dict(_trained_like(seed=1), no_bias).source_head is None
