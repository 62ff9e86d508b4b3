"""The model wrapper every imgcls run trains, saves and exports.

``Classifier`` = input scaling/normalization + a backbone network ``net``.  It
takes uint8 (or float in [0, 255]) NCHW batches, so decoded images stay uint8
(4x less memory and copying) until they reach the model, and an exported ONNX
file needs no normalization code on the client side.  The normalization is one
fused multiply-add: ``(x / 255 - mean) / std == x * scale + shift``.

:meth:`Classifier.from_file` rebuilds one from a saved ``model.safetensors``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .. import rundir
from ..data.preprocess import Preprocess
from ..errors import UserError, first_line
from ..tasks import output_count
from .registry import create_model


class Classifier(nn.Module):
    def __init__(self, net: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.net = net
        self.preprocess = preprocess
        mean = torch.tensor(preprocess.mean).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std).view(1, 3, 1, 1)
        # not saved with the weights: they are derived from preprocess.json
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @classmethod
    def from_file(cls, weights_path: str | Path) -> tuple[Classifier, dict]:
        """``model.safetensors`` (with imgcls metadata) -> (Classifier in eval mode, metadata).

        The metadata (model name, labels, preprocess, build options) rebuilds
        the network; a UserError when the file is not an imgcls model or its
        weights do not fit that network.
        """
        weights = Path(weights_path)
        meta = rundir.read_weights_meta(weights)
        preprocess = Preprocess.from_dict(meta["preprocess"])
        build = meta.get("build", {})
        net = create_model(meta["model"], output_count(meta, len(meta["labels"])), preprocess.input_size,
                           build.get("norm"), build.get("se", False), build.get("readout"))
        try:
            net.load_state_dict(load_file(str(weights)))
        except SafetensorError as err:
            raise UserError(f"{weights}: not a readable safetensors file ({err}); the file is truncated or"
                            " corrupt: copy it again, or train a new run") from None
        except RuntimeError as err:
            raise UserError(f"{weights}: the weights do not fit model {meta['model']}: {first_line(err)}") from None
        return cls(net, preprocess).eval(), meta

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_floating_point():
            x = x.to(self.scale.dtype)
        return x * self.scale + self.shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
