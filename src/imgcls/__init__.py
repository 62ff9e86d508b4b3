"""imgcls: train, evaluate and apply image classifiers.

The public API (the command line is a thin layer over it)::

    import imgcls
    result = imgcls.train("photos/", model="resnet18", out="runs/r1", epochs=10)
    metrics = imgcls.evaluate("runs/r1", "photos_test/")
    model = imgcls.load("runs/r1")            # or a model.safetensors / model.onnx file
    rows = model.predict(["a.jpg", "folder/"])
    print(imgcls.summary("alexnet", input_size=227).to_text())

Names are imported lazily so that ``imgcls.load("model.onnx")`` works in an
environment without torch (``pip install imgcls``, no ``[train]`` extra).
"""

from importlib import import_module

from .system import openmp_defaults

openmp_defaults()  # before anything imports torch: its OpenMP runtime reads them once

__version__ = "0.1.0"

_API = {
    "train": "imgcls.api",
    "evaluate": "imgcls.api",
    "summary": "imgcls.api",
    "load": "imgcls.prediction.predict",
    "Predictor": "imgcls.prediction.predict",
    "UserError": "imgcls.errors",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'imgcls' has no attribute {name!r}")
