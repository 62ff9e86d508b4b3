"""FLOPs of training, counted by torch's own counter.

One training step (forward, loss, backward) of a copy of the model on the ``meta`` device runs
under :class:`torch.utils.flop_counter.FlopCounterMode`: it counts every convolution and matrix
product of both passes (2 FLOPs per multiply-add, the convention of papers' "training FLOPs"),
costs no compute and leaves the real model, its BatchNorm statistics and the random state
untouched.  Those counts are linear in the batch size, so a run's total is the count of one full
batch times the images trained on, divided by the batch size; the optimizer's and the
element-wise work (norms, activations) count zero, as everywhere.

One formula is our own: torch's count of a convolution's weight gradient ignores ``groups``
(pytorch/pytorch#183405), which made a depthwise layer's backward C times too dear and
EfficientNet-Lite0's training step 14x its true count.  :func:`conv_backward_flop` counts each
gradient of a convolution at the forward pass's multiply-adds, which is what torch's own formula
gives for ``groups=1``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

from ..errors import first_line

log = logging.getLogger("imgcls")


def conv_backward_flop(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                       _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.convolution_backward``: the input's and the weight's gradients, each as dear as
    the forward convolution (whose weight shape already holds ``in_channels / groups``)."""
    forward = conv_flop_count(list(x_shape), list(w_shape), list(grad_out_shape), transposed=transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


COUNTER_FORMULAS = {torch.ops.aten.convolution_backward: conv_backward_flop}


def _counter() -> FlopCounterMode:
    return FlopCounterMode(display=False, custom_mapping=COUNTER_FORMULAS)


def _on_meta(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module).to("meta")


def step_flops(model: nn.Module, criterion: nn.Module, batch: int, input_size: int, target) -> int | None:
    """FLOPs of one training step of ``batch`` images of ``input_size`` px: ``model`` in training mode,
    forward, ``criterion`` on a batch of targets shaped like ``target`` (one image's), backward.
    None when the model cannot run on the meta device (then no FLOPs are reported)."""
    try:
        net, loss_fn = _on_meta(model).train(), _on_meta(criterion)
        images = torch.zeros((batch, 3, input_size, input_size), dtype=torch.uint8, device="meta")
        one = torch.as_tensor(np.asarray(target))
        targets = torch.zeros((batch, *one.shape), dtype=one.dtype, device="meta")
        with _counter() as counter:
            loss_fn(net(images), targets).backward()
        return int(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - an op without a meta kernel: the run goes on without a count
        log.info("training FLOPs not counted: the model does not run on the meta device (%s)", first_line(err))
        return None


def forward_flops(model: nn.Module, batch: int, input_size: int) -> int | None:
    """FLOPs of one inference forward pass (eval mode) of ``batch`` images, or None (see :func:`step_flops`)."""
    try:
        net = _on_meta(model).eval()
        images = torch.zeros((batch, 3, input_size, input_size), dtype=torch.uint8, device="meta")
        with torch.no_grad(), _counter() as counter:
            net(images)
        return int(counter.get_total_flops())
    except Exception as err:  # noqa: BLE001 - see step_flops
        log.info("eval FLOPs not counted (%s)", first_line(err))
        return None


def format_flops(flops: float | None) -> str:
    """``0.123 PFLOP``, ``45.6 TFLOP``: the largest unit that keeps the figure at or above 1."""
    if flops is None:
        return "n/a"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops / 1e6:.3g} MFLOP"
