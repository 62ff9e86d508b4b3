"""The classifier head of a network, and freezing and learning-rate groups around it.

A net built by :func:`~imgcls.models.registry.create_model` carries the
qualified name of its head in ``net.imgcls_classifier`` (its
``ModelSpec.classifier``), so code holding only the net, or a wrapper of it
such as :class:`~imgcls.models.classifier.Classifier`, knows its head.

Fine-tuning helpers: :func:`freeze_backbone` (+ :func:`set_frozen_bn_eval`
after every ``net.train()``) for a linear probe, :func:`param_groups` for
discriminative learning rates.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError

__all__ = [
    "HEAD_ATTR",
    "classifier_head",
    "head_prefix",
    "head_state_keys",
    "freeze_backbone",
    "unfreeze",
    "set_frozen_bn_eval",
    "param_groups",
]

HEAD_ATTR = "imgcls_classifier"
"""Attribute of a registry-built net: the qualified module name of its head."""


# --------------------------------------------------------------------------- the head


def _declared_head(net: nn.Module) -> str | None:
    """The declared head's qualified name in ``net``: from ``net`` itself or the
    first submodule carrying a declaration (a wrapped or compiled net)."""
    for name, module in net.named_modules():
        declared = getattr(module, HEAD_ATTR, None)
        if isinstance(declared, str):
            return f"{name}.{declared}" if name and declared else (name or declared)
    return None


def _own_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _last_param_leaf(module: nn.Module) -> nn.Module | None:
    """The last submodule (in registration order) holding parameters itself."""
    found = None
    for sub in module.modules():
        if _own_params(sub):
            found = sub
    return found


def _generic_head(net: nn.Module) -> nn.Module:
    """The head of a net without a declaration, in order: timm's
    ``get_classifier()``; torchvision's ``fc`` (ResNet, Inception, RegNet,
    ShuffleNet), ``classifier`` (a layer, or the last layer with parameters of
    a ``Sequential``: VGG, MobileNet, EfficientNet, ConvNeXt, SqueezeNet's 1x1
    conv), ``heads`` (ViT) or ``head`` (Swin); else the last ``nn.Linear``."""
    getter = getattr(net, "get_classifier", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # noqa: BLE001 - some wrappers define it differently
            head = None
        if isinstance(head, nn.Module) and _last_param_leaf(head) is not None:
            return _last_param_leaf(head)
    for attr in ("fc", "classifier", "heads", "head"):
        head = getattr(net, attr, None)
        if isinstance(head, nn.Module):
            leaf = _last_param_leaf(head)
            if leaf is not None:
                return leaf
    last = None
    for module in net.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise ValueError(f"cannot find the classifier head of {type(net).__name__}")
    return last


def classifier_head(net: nn.Module) -> nn.Module:
    """The module producing the class logits: the declared one (see the module
    docstring), else found generically."""
    declared = _declared_head(net)
    if declared is not None:
        return net.get_submodule(declared)
    # nets built outside the registry (torchvision / timm directly, tests) declare nothing
    return _generic_head(net)


def head_prefix(net: nn.Module) -> str:
    """Qualified name of the head module inside ``net`` (``"fc"``, ``"classifier.6"``...)."""
    declared = _declared_head(net)
    if declared is not None:
        return declared
    head = _generic_head(net)
    for name, module in net.named_modules():
        if module is head:
            return name
    raise ValueError("the head is not a submodule of the net")  # pragma: no cover


def head_state_keys(net: nn.Module) -> set[str]:
    """The state-dict keys of the head (``{"fc.weight", "fc.bias"}``)."""
    prefix = head_prefix(net)
    return {f"{prefix}.{k}" if prefix else k for k in net.get_submodule(prefix).state_dict()}


# --------------------------------------------------------------------------- freezing


def zero_head(net: nn.Module) -> None:
    """Zero the classifier head's parameters: every class starts at logit 0 (loss ln K).

    A replaced head keeps its architecture's random init, which can be far from
    that: timm's EfficientNet scales it by 1/sqrt(classes), so with 4 classes a
    pretrained backbone's features give logits with a std near 8 and a first
    loss near 9.  The first step then spends itself undoing the init, with large
    gradients into the backbone.  A zero head still learns (its gradient is
    features x (p - y)), and the backbone's gradients grow from zero with it.
    """
    with torch.no_grad():
        for param in classifier_head(net).parameters():
            param.zero_()


def _head_module_ids(net: nn.Module) -> set[int]:
    return {id(m) for m in classifier_head(net).modules()}


def freeze_backbone(net: nn.Module) -> list[str]:
    """Train only the classifier head: ``requires_grad=False`` everywhere else.

    Returns the names of the parameters left trainable.  Call
    :func:`set_frozen_bn_eval` after each ``net.train()`` so that frozen
    BatchNorm layers keep their running statistics too.
    """
    head_params = {id(p) for p in classifier_head(net).parameters()}
    trainable = []
    for pname, param in net.named_parameters():
        param.requires_grad_(id(param) in head_params)
        if param.requires_grad:
            trainable.append(pname)
    return trainable


def unfreeze(net: nn.Module) -> None:
    """Make every parameter trainable again (e.g. after a head-only warm-up)."""
    for param in net.parameters():
        param.requires_grad_(True)


def set_frozen_bn_eval(net: nn.Module) -> int:
    """Put the BatchNorm layers of the frozen part into eval mode; returns how many.

    ``net.train()`` switches every BatchNorm back to updating its running
    mean/var, which would shift a frozen backbone's features; call this right
    after it.  A BatchNorm counts as frozen when none of its own parameters
    requires grad (without affine parameters: when it lies outside the head
    and the net has frozen parameters).
    """
    head = _head_module_ids(net)
    any_frozen = any(not p.requires_grad for p in net.parameters())
    count = 0
    for module in net.modules():
        if not isinstance(module, nn.modules.batchnorm._BatchNorm):
            continue
        params = list(module.parameters(recurse=False))
        frozen = (not any(p.requires_grad for p in params)) if params else (any_frozen and id(module) not in head)
        if frozen:
            module.eval()
            count += 1
    return count


def param_groups(net: nn.Module, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]:
    """Optimizer parameter groups for discriminative learning rates.

    The head trains at ``lr``, the rest at ``lr * backbone_lr_mult``.
    Frozen parameters are left out; a multiplier of 0 leaves the backbone out
    (then also call :func:`freeze_backbone` to save its gradients).  Each
    group carries a ``name`` ("head" / "backbone") for logging.
    """
    if backbone_lr_mult < 0:
        raise UserError(f"the backbone learning-rate multiplier must be >= 0, not {backbone_lr_mult}")
    head_params = {id(p) for p in classifier_head(net).parameters()}
    head, backbone = [], []
    for param in net.parameters():
        if param.requires_grad:
            (head if id(param) in head_params else backbone).append(param)
    groups = []
    if backbone and backbone_lr_mult > 0:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    if head:
        groups.append({"params": head, "lr": lr, "name": "head"})
    return groups
