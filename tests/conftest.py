import csv

import pytest
import torch
from imagezoo import make_class_tree

# One intra-op thread: the tests' tensors are tiny, and with two OpenMP threads a
# busy core (another process, a decode thread) makes small passes 10-50x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def array_cache_dir(tmp_path_factory):
    """Training's array cache (--cache auto on small images) writes here, not into ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("array-cache")
    old = os.environ.get("IMGCLS_CACHE_DIR")
    os.environ["IMGCLS_CACHE_DIR"] = str(folder)
    yield folder
    if old is None:
        os.environ.pop("IMGCLS_CACHE_DIR", None)
    else:
        os.environ["IMGCLS_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """Three learnable classes of 32 px PNGs, 16 each."""
    root = tmp_path_factory.mktemp("tiny")
    make_class_tree(root, {"cat": 16, "dog": 16, "fox": 16}, size=(32, 32), seed=0)
    return root


# most tests skip the ONNX export at the end of training; tests of predict/export turn it on
FAST = dict(model="cifarnet", batch_size=8, workers=0, lr=3e-3, warmup_epochs=0, label_smoothing=0.0,
            export_onnx=False, int8="off")


def predict_rows_by_backend(run, images, tmp_path) -> dict[str, list[dict]]:
    """``imgcls predict RUN IMAGES`` over ONNX Runtime and over torch: each backend's CSV rows."""
    from imgcls.cli import main

    rows = {}
    for backend in ("onnx", "torch"):
        out = tmp_path / f"{backend}.csv"
        assert main(["-q", "predict", str(run), str(images), "--out", str(out), "--backend", backend]) == 0
        rows[backend] = list(csv.DictReader(out.open()))
    return rows
