"""A network split in two: the frozen trunk and its trainable last stage (the tail).

The ``tail`` strategy (:mod:`imgcls.train.tail`) computes the trunk's output
(the input of the last stage) once per view, then trains the last stage and
the head on those cached maps.  The split is declared as data, per family:
the tail's modules in forward order; applied one after the other (the input
flattened before the classifier) they must give what the whole net gives,
which :func:`split_problem` checks numerically before anything is trained.

Written here because neither timm nor torchvision exposes "run from stage k":
timm's ``forward_intermediates`` stops at a stage but does not resume from one.
"""

from __future__ import annotations

from torch import nn

# family -> the tail's modules, in forward order (the trunk is everything before the first)
TAILS: dict[str, tuple[str, ...]] = {
    "efficientnet": ("blocks.6", "conv_head", "bn2", "global_pool", "classifier"),  # timm EfficientNet(-Lite)
    "resnet": ("layer4", "avgpool", "fc"),                                          # torchvision ResNet
    "convnext": ("stages.3", "norm_pre", "head"),                                    # timm ConvNeXt
    "convnextv2": ("stages.3", "norm_pre", "head"),
}


class Tail(nn.Module):
    """The last stage and head of a net as one module: maps in, logits out.

    It holds the net's own modules (not copies): training it trains the net."""

    def __init__(self, net: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.names = names
        self.parts = nn.ModuleList(net.get_submodule(n) for n in names)

    def forward(self, x):
        for part in self.parts:
            if isinstance(part, nn.Linear) and x.ndim > 2:
                x = x.flatten(1)
            x = part(x)
        return x

    def features(self, x):
        """The pooled features (the head's input)."""
        for part in self.parts[:-1]:
            x = part(x)
        return x.flatten(1)


class Trunk(nn.Module):
    """The net up to the tail: images in, the tail's input maps out.

    Runs the whole net and keeps the first tail module's input (a forward
    pre-hook); exported to ONNX, the ops after it are not part of the graph."""

    def __init__(self, net: nn.Module, first: str):
        super().__init__()
        self.net = net
        self.first = first

    def forward(self, x):
        store = []
        hook = self.net.get_submodule(self.first).register_forward_pre_hook(lambda m, args: store.append(args[0]))
        try:
            self.net(x)
        finally:
            hook.remove()
        return store[0]


def split(net: nn.Module, family: str) -> tuple[Trunk, Tail] | None:
    """``(trunk, tail)`` of ``net`` for its family, or None when the family declares no tail."""
    names = TAILS.get(family)
    if names is None:
        return None
    try:
        tail = Tail(net, names)
    except AttributeError:  # a variant without these modules (e.g. a swapped stem)
        return None
    return Trunk(net, names[0]), tail


def split_problem(net: nn.Module, trunk: Trunk, tail: Tail, sample) -> str | None:
    """None when ``tail(trunk(x)) == net(x)`` on ``sample`` (normalized images), else why not."""
    import torch

    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            logits = net(sample)
            diff = float((tail(trunk(sample)) - logits).abs().max())
    except RuntimeError as err:  # shapes that do not chain: the declared split does not fit this net
        return f"its last stage cannot run on the trunk's output ({str(err).splitlines()[0]})"
    finally:
        net.train(was_training)
    if not diff <= 1e-4 * max(1.0, float(logits.abs().max())):
        return f"its last stage run alone differs from the whole network by {diff:.3g}"
    return None
