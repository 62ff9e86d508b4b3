"""Model comparison (imgcls.models.compare) and the model catalog (imgcls.models.catalog)."""

import csv
import io
import json

import pytest
import yaml

from imgcls.errors import UserError
from imgcls.models import catalog
from imgcls.models.compare import compare_models, format_comparison, run_accuracy

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _fake_run(path, model, **summary):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"model": model, "epochs": 1}))
    (path / "summary.json").write_text(json.dumps(summary))
    return path


def test_run_accuracy_prefers_test(tmp_path):
    both = _fake_run(tmp_path / "a", "cifarnet", best_val_accuracy=0.5, test_accuracy=0.61)
    val = _fake_run(tmp_path / "b", "cifarnet", best_val_accuracy=0.7)
    assert run_accuracy(both) == {"run": str(both), "model": "cifarnet", "accuracy": 0.61, "split": "test"}
    assert run_accuracy(val)["split"] == "val" and run_accuracy(val)["accuracy"] == 0.7
    with pytest.raises(UserError, match="not a run directory"):
        run_accuracy(tmp_path)


def test_compare_two_tiny_models(tmp_path):
    run = _fake_run(tmp_path / "run1", "cifarnet", best_val_accuracy=0.5, test_accuracy=0.61)
    _fake_run(tmp_path / "run2", "cifarnet", best_val_accuracy=0.9)  # val only: test wins
    plot = tmp_path / "plots" / "compare.png"
    rows = compare_models(["cifarnet", "resnet18"], input_size=32, runs=[run, tmp_path / "run2"],
                          batch=4, repeats=2, warmup=1, threads=1, plot_path=plot)
    assert [r["model"] for r in rows] == ["cifarnet", "resnet18"]
    cifar, res = rows
    assert cifar["accuracy"] == 0.61 and cifar["accuracy_split"] == "test" and cifar["run"] == str(run)
    assert res["accuracy"] is None
    # cifarnet with 1000 classes: 456 + 2416 + 48120 + 10164 + 85000
    assert cifar["params"] == 146_156 and cifar["weights_mb"] == pytest.approx(146_156 * 4 / 1e6)
    assert res["macs"] > cifar["macs"] > 0 and res["peak_activation_mb"] > 0
    for r in rows:
        assert r["latency_ms"] > 0 and r["throughput"] > 0
        assert r["backend"] == "torch eager CPU, 1 thread"
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    import matplotlib.image
    assert matplotlib.image.imread(plot).ndim == 3
    parsed = list(csv.DictReader(io.StringIO(format_comparison(rows, "csv"))))
    assert parsed[0]["model"] == "cifarnet" and float(parsed[0]["accuracy"]) == 0.61
    assert json.loads(format_comparison(rows, "json"))[1]["model"] == "resnet18"
    text = format_comparison(rows)
    assert "0.6100 (test)" in text and "torch eager CPU" in text
    assert format_comparison(rows, "md").startswith("| model |")


def test_compare_runs_only_without_speed(tmp_path):
    run = _fake_run(tmp_path / "r", "cifarnet", best_val_accuracy=0.42)
    plot = tmp_path / "p.png"
    rows = compare_models(runs=[run], speed=False, plot_path=plot)
    assert len(rows) == 1 and rows[0]["input_size"] == 32 and rows[0]["accuracy"] == 0.42
    assert rows[0]["latency_ms"] is None and plot.read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(UserError):
        compare_models([])


def test_catalog_rows_and_cache(tmp_path, monkeypatch):
    import imgcls.models.pretrained as pretrained
    monkeypatch.setattr(pretrained, "pretrained_available", lambda name: name == "resnet18", raising=False)
    rows = catalog.catalog_rows(["cifarnet", "resnet18"], cache_dir=tmp_path)
    by = {r["name"]: r for r in rows}
    assert by["resnet18"]["params"] == 11_689_512 and by["resnet18"]["macs"] == 1_814_074_344
    assert by["resnet18"]["input_size"] == 224 and by["resnet18"]["pretrained"] is True
    assert by["cifarnet"]["input_size"] == 32 and by["cifarnet"]["pretrained"] is False
    assert (tmp_path / catalog.CACHE_FILE).exists()

    # second call comes from the cache: no model is built
    def boom(*a, **k):
        raise AssertionError("not cached")
    monkeypatch.setattr(catalog, "model_size", boom)
    assert catalog.catalog_rows(["cifarnet", "resnet18"], cache_dir=tmp_path) == rows

    text = catalog.format_catalog(rows)
    assert "11.69M" in text and "1.81G" in text
    assert list(csv.DictReader(io.StringIO(catalog.format_catalog(rows, "csv"))))[1]["params"] == "11689512"
    assert json.loads(catalog.format_catalog(rows, "json"))[0]["name"] == "cifarnet"
