"""`imgcls demo`: the whole pipeline on a dataset that ships with a dependency.

scikit-learn's handwritten digits (1,797 8x8 grayscale scans, 10 classes) are
written out as PNG class folders (``train/`` and a held-out ``test/``), a
small CNN is trained on them, evaluated on the test split, and applied to a
few files, exactly as a user would do with their own images.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .api import train
from .prediction.predict import load


def write_digits(root: Path, test_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits as ``root/{train,test}/<digit>/<n>.png``; returns root."""
    from sklearn.datasets import load_digits  # scikit-learn is slow to import; only the digits need it

    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    n_test = int(len(order) * test_fraction)
    for rank, i in enumerate(order):
        split = "test" if rank < n_test else "train"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root


def run_demo(out: str | Path | None = None, epochs: int = 15) -> dict:

    base = Path(out) if out else Path(tempfile.mkdtemp(prefix="imgcls-demo-"))
    data = write_digits(base / "digits")
    print(f"demo data: scikit-learn digits as PNG files in {data} (train/ and test/ class folders)")
    # digits are not mirror-symmetric and are centred: no flips, gentle crops, no colour jitter
    result = train(data, base / "run", model="cifarnet", epochs=epochs, batch_size=32, lr=3e-3,
                   augment={"crop_scale": (0.85, 1.0), "crop_ratio": (0.9, 1.1), "hflip": False, "color_jitter": 0.0,
                            "enabled": True}, label_smoothing=0.0)
    summary = result.summary
    predictor = load(result.run_dir)
    test_images = sorted((data / "test").rglob("*.png"))
    samples = test_images[:: len(test_images) // 5][:5]
    print("\nsample predictions:")
    for row in predictor.predict(samples):
        print(f"  {Path(row['path']).relative_to(data)}  ->  {row['label']}  (p={row['prob']:.3f})")
    print(f"\ntest accuracy: {summary['test_accuracy']:.4f}  ({summary['n_test']} held-out images)")
    print(f"confusion matrix: {result.run_dir / 'test_confusion_matrix.png'}")
    print(f"run directory: {result.run_dir}")
    return summary
