"""Export: a trained classifier to one ONNX file that predicts on its own, and its int8 twin.

* :mod:`.graph`: the export itself (``export_onnx``), the metadata that makes
  the file self-contained (labels, preprocessing, task, temperature), and the
  parity check against PyTorch that a file must pass to be written;
* :mod:`.int8`: static int8 quantization and the figures that compare two
  engines (``agreement``, ``compare_engines``);
* :mod:`.gate`: a run directory's export (``export_run``) and the accuracy gate
  that keeps an int8 file only when it loses at most one point on the run's
  validation split (``gate_int8``).

Callers use the names below from ``imgcls.export``; the submodules hold them.
"""

from .gate import MAX_INT8_LOSS, export_run, gate_int8, loss_of_points
from .graph import (PARITY_ATOL, ExportError, export_onnx, onnx_model, parity, parity_tolerance, stamp_metadata,
                    torch_logits, with_linear_head)
from .int8 import agreement, compare_engines, quantize_int8

__all__ = ["MAX_INT8_LOSS", "PARITY_ATOL", "ExportError", "agreement", "compare_engines", "export_onnx", "export_run",
           "gate_int8", "loss_of_points", "onnx_model", "parity", "parity_tolerance", "quantize_int8",
           "stamp_metadata", "torch_logits", "with_linear_head"]
