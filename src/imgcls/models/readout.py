"""A read-out of several layers: pooled outputs of a net's last blocks beside its final features.

Frozen ImageNet features are weakest on images unlike ImageNet's photos
(MRI, steel, satellite), and there the earlier blocks' features are less
specialised than the last layer's.  :class:`ReadoutNet` wraps a net and
gives its linear head the global-average-pooled outputs of some of its
blocks (the *taps*) next to the net's own pooled features::

    features = [pool(tap_1), ..., pool(tap_m), net_features]   ->  head (nn.Linear)

The net's own features come last, so the source classifier (which reads
them) stays a valid prior on the wider features, padded with zeros.  The
taps are declared as data per family (:data:`TAPS`) and recorded in the
model file's ``build`` metadata, so :func:`~.registry.create_model` rebuilds
the same network from the file alone.

Written here because neither timm nor torchvision returns pooled
intermediate features of an arbitrary net *and* its logits from one module
that exports to ONNX; forward hooks do, and the dynamo exporter traces them.
"""

from __future__ import annotations

import torch
from torch import nn

from .heads import HEAD_ATTR, classifier_head, head_prefix

# family -> the blocks whose pooled outputs the head reads beside the final features
TAPS: dict[str, tuple[str, ...]] = {
    "efficientnet": ("blocks.3", "blocks.4", "blocks.5", "blocks.6"),  # timm EfficientNet(-Lite): strides 16-32
}


def readout_taps(family: str) -> tuple[str, ...]:
    """The taps declared for ``family``; empty when it has none (the head reads the final features)."""
    return TAPS.get(family, ())


class ReadoutNet(nn.Module):
    """``net`` with its head replaced by a Linear on pooled tap outputs + the net's pooled features.

    ``net`` keeps its modules but its head becomes ``nn.Identity`` (it returns
    its features).  ``head`` is a new ``nn.Linear(dim, num_classes)``, where
    ``dim`` is measured by one forward pass of a small input."""

    def __init__(self, net: nn.Module, taps: tuple[str, ...] | list[str], num_classes: int, input_size: int = 64):
        super().__init__()
        prefix = head_prefix(net)
        if not prefix:
            raise ValueError("a multi-layer read-out needs a net with a separate classifier head")
        final_dim = classifier_head(net).in_features
        net.set_submodule(prefix, nn.Identity())
        self.net = net
        self.taps = tuple(taps)
        for name in self.taps:
            net.get_submodule(name)  # AttributeError now, not at the first forward
        device = next(net.parameters()).device
        was_training = net.training
        net.eval()
        with torch.no_grad():
            dim = self.features(torch.zeros(1, 3, input_size, input_size, device=device)).shape[1]
        net.train(was_training)
        self.final_dim = int(final_dim)
        self.head = nn.Linear(int(dim), num_classes, device=device)
        setattr(self, HEAD_ATTR, "head")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        store: list[torch.Tensor] = []
        hooks = [self.net.get_submodule(name).register_forward_hook(
            lambda module, args, out: store.append(out.mean((2, 3)))) for name in self.taps]
        try:
            final = self.net(x)
        finally:
            for hook in hooks:
                hook.remove()
        return torch.cat([*store, final.flatten(1)], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def with_readout(net: nn.Module, taps, num_classes: int, input_size: int = 64) -> nn.Module:
    """``net`` read out at ``taps`` (a :class:`ReadoutNet`), or ``net`` itself when ``taps`` is empty."""
    return ReadoutNet(net, taps, num_classes, input_size) if taps else net
