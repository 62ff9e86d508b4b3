"""Prediction: a trained model applied to files in, trustworthy rows out, on one machine or many.

::

    engines.py      torch and ONNX Runtime behind one call: engine(uint8 batch) -> logits
    predict.py      load a run or a model file; stream inputs through the engine; resume
    outputs.py      CSV, JSON Lines, MegaDetector JSON, Camtrap DP, folders by label
    rowfiles.py     rows streamed to disk as they come, resumed by position after a crash
    fingerprint.py  the OUT.meta.json sidecar: which model and options made an output
    shards.py       a deterministic share of the inputs for each of N jobs
    merge.py        the shards' outputs -> one output
    cluster.py      the same predictor on a Ray cluster (optional extra)
"""
