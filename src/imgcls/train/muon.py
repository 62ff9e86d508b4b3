"""Muon for convolution filters (``--muon LR MOMENTUM``), as airbench94_muon trains them.

Muon (Jordan et al. 2024) replaces each weight's momentum update by the nearest semi-orthogonal
matrix, found by a few Newton-Schulz iterations; airbench94_muon uses it on the 3x3 filters (each
flattened to out x in*k*k) and renormalises every filter bank to norm sqrt(out) before the step,
with SGD on everything else.  Written here because ``torch.optim.Muon`` takes 2-D parameters
only.  :class:`MuonSGD` is ``torch.optim.SGD`` whose ``muon`` groups get their gradient
replaced by the orthogonalised update before SGD takes the step (those groups carry no SGD
momentum or decay), so one optimizer keeps one state dict and any learning-rate schedule applies
to both kinds of group.
"""

from __future__ import annotations

import torch

from ..errors import UserError

# the quintic iteration's coefficients and step count of airbench94_muon (and torch.optim.Muon's coefficients)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 3


def check(muon, optimizer: str) -> None:
    """Raise a :class:`UserError` for a ``--muon`` that cannot be trained (before any data is read)."""
    if muon is None:
        return
    lr, momentum = muon
    if not lr > 0 or not 0 <= momentum < 1:
        raise UserError(f"--muon {lr:g} {momentum:g}: give a learning rate > 0 and a momentum in [0, 1)")
    if optimizer != "sgd":
        raise UserError(f"--muon trains the parameters it does not take with SGD, not {optimizer}: add --optimizer sgd")


def orthogonalize(update: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for ``update`` = U S V^T (2-D).  Its singular values
    land near 1 (between about 0.5 and 1.5 after 3 steps), which Muon's authors found trains as well.

    ``dtype``: the iterations' precision (default: bf16 on a GPU, as airbench94_muon runs them; else the
    update's own, since CPUs without native bf16 emulate it); the result has the update's dtype."""
    a, b, c = NS_COEFFICIENTS
    if dtype is None:
        dtype = torch.bfloat16 if update.is_cuda else update.dtype
    x = update.to(dtype)
    x = x / (x.norm() + eps)
    wide = x.size(0) <= x.size(1)
    if not wide:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).to(update.dtype)


def is_filter(p: torch.Tensor) -> bool:
    """The parameters Muon trains: convolution kernels (3-D and up)."""
    return p.ndim >= 3


def group_settings(lr: float, momentum: float) -> dict:
    """A filter group's settings: Muon's rate and momentum, and no SGD momentum or decay on top."""
    return {"lr": lr, "muon": True, "muon_momentum": momentum, "momentum": 0.0, "nesterov": False,
            "weight_decay": 0.0}


class MuonSGD(torch.optim.SGD):
    """SGD whose groups marked ``muon`` take Muon steps (Nesterov momentum ``muon_momentum``)."""

    def step_flops(self) -> int:
        """FLOPs of one step's Newton-Schulz iterations, which a count of forward and backward passes
        misses: per iteration on an m x n update (m <= n), two m x m x n products and one m x m x m."""
        total = 0
        for group in self.param_groups:
            if group.get("muon"):
                for p in group["params"]:
                    if p.requires_grad:
                        m, n = sorted((len(p), p[0].numel()))
                        total += NS_STEPS * (4 * m * m * n + 2 * m ** 3)
        return total

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the gradients it recomputes are the ones to orthogonalise
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group.get("muon"):
                continue
            beta = group["muon_momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                buffer = state.get("muon_buffer")
                if buffer is None:
                    buffer = state["muon_buffer"] = torch.zeros_like(p.grad)
                buffer.mul_(beta).add_(p.grad)
                update = p.grad.add(buffer, alpha=beta)
                p.mul_(len(p) ** 0.5 / p.norm().clamp_min(1e-12))
                p.grad.copy_(orthogonalize(update.reshape(len(update), -1)).view_as(p.grad))
        super().step()
        return loss
