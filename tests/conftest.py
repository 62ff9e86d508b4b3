import pytest
from imagezoo import make_class_tree


@pytest.fixture(scope="session")
def tiny_tree(tmp_path_factory):
    """Three learnable classes of 32 px PNGs, 16 each."""
    root = tmp_path_factory.mktemp("tiny")
    make_class_tree(root, {"cat": 16, "dog": 16, "fox": 16}, size=(32, 32), seed=0)
    return root


FAST = dict(model="cifarnet", batch_size=8, workers=0, lr=3e-3, warmup_epochs=0, label_smoothing=0.0)
