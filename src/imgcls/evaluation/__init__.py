"""Evaluation: logits and labels -> metrics, calibration, review thresholds, plots and the HTML report.

::

    metrics.py      accuracy, balanced accuracy, per-class precision/recall/F1, NLL, confusion matrices
    calibration.py  expected calibration error, reliability bins, temperature scaling
    thresholds.py   per-class probability thresholds for a review budget
    aggregate.py    the frames of one capture event -> one row
    tta.py          test-time augmentation: the mean logits of several views
    plots.py        training curves, confusion matrices, reliability diagrams (matplotlib)
    html_report.py  the self-contained report page of a run

Nothing here imports torch: it works on the logits of either engine (tests/test_structure.py).
"""
