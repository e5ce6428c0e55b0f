"""Faster ghost clipping on top of Opacus' ``grad_sample_mode="ghost"``: same clipped gradients, less work.

Ghost clipping (Li et al. 2022) needs each example's gradient norm before it can form the clipped sum
``sum_i min(1, C / ||g_i||) g_i``. Opacus 1.6 gets the norms from a first ``loss.backward()`` whose hooks see
every layer's activations and output gradients, then throws that pass's parameter gradients away and runs a
second backward on the re-weighted loss. The first pass therefore also computes every ``nn.Linear`` weight
gradient (``a^T g``, about half of a transformer's backward FLOPs) only to zero it.

:func:`ghost_backward` runs the first pass with ``torch.autograd.grad`` towards the *cheap* trainable tensors
only (biases, LayerNorm and embedding weights): autograd then still propagates the output gradient through
every layer, so every Opacus hook fires, but skips the weight-gradient products nobody reads. The second pass
is Opacus' own. It clears every norm before the first pass, checks that every trainable tensor got a fresh
per-example norm in it (and that no trainable tensor is shared between modules), and raises otherwise: a
stale or missing norm would clip with the wrong factor, which is a privacy failure, not a slowdown.

:func:`fast_linear_norms` registers a ``nn.Linear`` norm sampler that computes each example's
output-gradient Gram matrix once (Opacus' builds it twice, for the weight and again for the bias) and the bias
norm as ``||sum_t g_t||`` directly. Both are checked against Opacus' own functions and brute-force per-example
gradients in ``tests/test_ghost.py``; ``benchmarks/dp_overhead.py`` measures them side by side.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_lock = threading.Lock()
_users = 0  # open fast_linear_norms() blocks
_previous = None  # the sampler they replaced


def linear_norm_sample(layer: nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor
                       ) -> dict[nn.Parameter, torch.Tensor]:
    """Per-example gradient L2 norms of ``layer.weight`` and ``layer.bias`` from the layer's inputs ``a`` and
    output gradients ``g`` (shapes ``[n, d_in]``/``[n, d_out]`` or ``[n, T, d_in]``/``[n, T, d_out]``).

    For sequences, ``||sum_t g_t a_t^T||_F^2 = <g g^T, a a^T>`` over the T x T Gram matrices, which costs
    ``T^2 (d_in + d_out)`` per example against ``T d_in d_out`` for forming the gradient (cheaper whenever
    ``T < d_in d_out / (d_in + d_out)``: 192 for a 384 x 384 layer); the bias gradient is ``sum_t g_t``.
    """
    a = activations[0].to(backprops.dtype)
    g = backprops
    out: dict[nn.Parameter, torch.Tensor] = {}
    if g.dim() == 2:
        g_sq = (g * g).sum(-1)
        if layer.weight.requires_grad:
            out[layer.weight] = torch.sqrt(g_sq * (a * a).sum(-1))
        if layer.bias is not None and layer.bias.requires_grad:
            out[layer.bias] = torch.sqrt(g_sq)
        return out
    if g.dim() != 3:  # Opacus' own sampler silently returns no norm here (a stale one would be used): refuse
        raise ValueError(f"linear_norm_sample expects 2-D or 3-D output gradients, got shape {tuple(g.shape)}")
    if layer.weight.requires_grad:
        ggt = torch.bmm(g, g.transpose(1, 2))
        aat = torch.bmm(a, a.transpose(1, 2))
        out[layer.weight] = torch.sqrt((ggt * aat).sum((1, 2)).clamp(min=0))
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(1).norm(dim=-1)
    return out


@contextmanager
def fast_linear_norms() -> Iterator[None]:
    """Use :func:`linear_norm_sample` as Opacus' ghost-clipping norm sampler for ``nn.Linear`` inside the
    block (Opacus keeps norm samplers in one class-level registry). Nested or concurrent blocks share one
    installation; the previous sampler comes back when the last block exits, also on an exception."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Gsm

    global _users, _previous
    registry = Gsm.NORM_SAMPLERS
    with _lock:
        if _users == 0:
            _previous = registry.get(nn.Linear)
            registry[nn.Linear] = linear_norm_sample
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                if _previous is None:
                    registry.pop(nn.Linear, None)
                else:
                    registry[nn.Linear] = _previous


def cheap_inputs(module: nn.Module) -> list[nn.Parameter]:
    """Trainable tensors whose gradients cost little next to ``nn.Linear`` weight gradients: everything
    trainable except Linear weights (in a BERT classifier: biases, LayerNorm and embedding weights)."""
    linear_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    return [p for p in module.parameters() if p.requires_grad and id(p) not in linear_weights]


def _check_no_shared_parameters(gsm) -> None:
    """A tensor used by two modules gets one norm per module from Opacus' hooks, the last overwriting the
    others (fresh, but only part of the example's gradient): refuse such models. Checked once per wrapper."""
    if getattr(gsm, "_fedpriv_sharing_checked", False):
        return
    owners: dict[int, str] = {}
    for name, module in gsm.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) in owners:
                raise RuntimeError(f"ghost clipping: trainable tensor {name}.{pname} is also {owners[id(p)]}; "
                                   "per-example norms of shared tensors are not supported")
            owners.setdefault(id(p), f"{name}.{pname}")
    gsm._fedpriv_sharing_checked = True


def ghost_backward(loss) -> None:
    """Drop-in for ``loss.backward()`` on the ``DPTensorFastGradientClipping`` that Opacus' ghost criterion
    returns: afterwards every trainable ``p.grad`` holds ``sum_i c_i * grad_i`` (``c_i = min(1, C/||g_i||)``),
    exactly what Opacus' own two-pass backward leaves, for the DP optimizer to noise and scale."""
    gsm, optimizer, per_sample = loss.module, loss.optimizer, loss.loss_per_sample
    if loss.loss_reduction == "mean":
        reduced = per_sample.mean(dim=0)
    elif loss.loss_reduction == "sum":
        reduced = per_sample.sum(dim=0)
    else:
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss.loss_reduction!r}")
    params = list(gsm.trainable_parameters)
    _check_no_shared_parameters(gsm)
    # Nothing cheap to aim at (only bias-free Linear layers train): aim at everything, still checked below.
    inputs = cheap_inputs(gsm) or params
    for p in params:  # last step's norms must never be mistaken for this step's
        p._norm_sample = None
    torch.autograd.grad(reduced, inputs, retain_graph=True, allow_unused=True)
    n = per_sample.shape[0]
    stale = [i for i, p in enumerate(params) if p._norm_sample is None or p._norm_sample.shape[0] != n]
    if stale:
        raise RuntimeError(f"ghost clipping: no per-example norm for {len(stale)} of {len(params)} trainable tensors "
                           "after the first backward pass; refusing to clip with incomplete norms")
    optimizer.zero_grad()  # as Opacus does between its passes (keeps accumulated summed_grad)
    coeff = gsm.get_clipping_coef()
    gsm.disable_hooks()
    try:
        (coeff.to(per_sample.device) * per_sample).sum().backward()
    finally:
        gsm.enable_hooks()
