"""Faster ghost clipping (client/ghost.py): the per-example norms and the clipped gradient sum it leaves in
``p.grad`` are those of Opacus' own two-pass ghost clipping and of brute force, one backward per example;
it refuses to clip when a trainable tensor got no fresh norm."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from client.ghost import cheap_inputs, fast_linear_norms, ghost_backward, linear_norm_sample
from common.inference import forward, tensors

CPU = torch.device("cpu")
ATOL = 1e-10  # float64 throughout: the paths differ only in summation order (~1e-14 measured)
OPACUS_NORM_EPS = 1e-6  # Opacus clips with factor min(1, C / (||g_i|| + 1e-6))


def brute_linear_norms(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """Form each example's weight and bias gradient explicitly and take its norm."""
    a3, g3 = (a, g) if a.dim() == 3 else (a[:, None], g[:, None])
    w = torch.einsum("ntj,nti->nji", g3, a3)
    return {"weight": w.flatten(1).norm(dim=1), "bias": g3.sum(1).norm(dim=1)}


@pytest.mark.parametrize("shape", [(5, 7), (5, 9, 7)], ids=["2d", "sequence"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_norm_sample_is_the_per_example_gradient_norm(shape, bias):
    from opacus.grad_sample.linear import compute_linear_norm_sample

    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(7, 3, bias=bias).double()
    a = torch.randn(*shape, generator=gen, dtype=torch.float64)
    g = torch.randn(*shape[:-1], 3, generator=gen, dtype=torch.float64)
    ours = linear_norm_sample(layer, [a], g)
    brute = brute_linear_norms(layer, a, g)
    theirs = compute_linear_norm_sample(layer, [a], g)
    assert set(ours) == ({layer.weight, layer.bias} if bias else {layer.weight})
    for name, p in (("weight", layer.weight), ("bias", layer.bias)):
        if p is None:
            continue
        assert ours[p].shape == (5,)
        assert torch.allclose(ours[p], brute[name], atol=ATOL, rtol=0)
        assert torch.allclose(ours[p], theirs[p], atol=ATOL, rtol=0)


def test_linear_norm_sample_skips_frozen_tensors_and_refuses_other_shapes():
    layer = nn.Linear(4, 2)
    layer.weight.requires_grad_(False)
    out = linear_norm_sample(layer, [torch.randn(3, 4)], torch.randn(3, 2))
    assert set(out) == {layer.bias}
    with pytest.raises(ValueError, match=r"2-D or 3-D output gradients, got shape \(3, 2, 2, 2\)"):
        linear_norm_sample(layer, [torch.randn(3, 2, 2, 4)], torch.randn(3, 2, 2, 2))


def ghost_setup(model: nn.Module, clip: float, n: int):
    """Opacus' ghost-clipping module, optimizer and criterion, as PrivacyEngine.make_private builds them."""
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=clip, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(torch.optim.SGD([p for p in gsm.parameters() if p.requires_grad], lr=0.0),
                                          noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=n)
    return gsm, opt, DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(reduction="mean"))


def clipped_grads(model, enc, clip: float, *, ours: bool) -> dict[str, torch.Tensor]:
    from contextlib import nullcontext

    gsm, opt, crit = ghost_setup(model, clip, len(enc))
    gsm.train()
    ids, mask, y = tensors(enc, 0)
    opt.zero_grad(set_to_none=True)
    with fast_linear_norms() if ours else nullcontext():
        loss = crit(forward(gsm, ids, mask, CPU), y)
        ghost_backward(loss) if ours else loss.backward()
    out = {k.removeprefix("_module."): p.grad.detach().clone() for k, p in gsm.named_parameters() if p.requires_grad}
    gsm._close()
    return out


def brute_clipped_sum(model, enc, clip: float) -> dict[str, torch.Tensor]:
    """sum_i min(1, C / (||g_i|| + 1e-6)) g_i from one backward pass per example (no Opacus), and the norms."""
    ids, mask, y = tensors(enc, 0)
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    total = {k: torch.zeros_like(p) for k, p in params.items()}
    norms = []
    for i in range(len(enc)):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(model, ids[i: i + 1], mask[i: i + 1], CPU), y[i: i + 1]).backward()
        g = {k: p.grad.detach().clone() for k, p in params.items()}
        norm = float(torch.sqrt(sum((v ** 2).sum() for v in g.values())))
        norms.append(norm)
        for k in total:
            total[k] += min(1.0, clip / (norm + OPACUS_NORM_EPS)) * g[k]
    model.zero_grad(set_to_none=True)
    return total, norms


@pytest.mark.parametrize(("part", "top_k"), [("full", 0), ("head", 1)], ids=["full", "head+1"])
def test_ghost_backward_leaves_the_clipped_sum_opacus_and_brute_force_give(make_model, toy_encoded, part, top_k):
    base = make_model(part, top_k, dropout=False).double()
    base.train()
    ref, norms = brute_clipped_sum(copy.deepcopy(base), toy_encoded, clip=1.0)
    clip = sorted(norms)[len(norms) // 2]  # binds for about half of the examples: factors differ per example
    ref, norms = brute_clipped_sum(copy.deepcopy(base), toy_encoded, clip=clip)
    assert sum(nm > clip for nm in norms) >= 3 and sum(nm < clip for nm in norms) >= 3
    ours = clipped_grads(copy.deepcopy(base), toy_encoded, clip, ours=True)
    opacus = clipped_grads(copy.deepcopy(base), toy_encoded, clip, ours=False)
    assert list(ours) == list(ref) == list(opacus)
    for k in ref:
        # p.grad holds the clipped sum; the DP optimizer adds noise and divides by the expected batch size
        assert torch.allclose(ours[k], opacus[k], atol=ATOL, rtol=0), k
        assert torch.allclose(ours[k], ref[k], atol=ATOL, rtol=0), k
    unclipped, _ = brute_clipped_sum(copy.deepcopy(base), toy_encoded, clip=1e9)
    assert max(float((unclipped[k] - ref[k]).abs().max()) for k in ref) > 1e3 * ATOL  # the clip changed it


def test_fast_linear_norms_is_scoped_to_its_block():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Gsm
    from opacus.grad_sample.linear import compute_linear_norm_sample

    assert Gsm.NORM_SAMPLERS[nn.Linear] is compute_linear_norm_sample
    with pytest.raises(KeyError), fast_linear_norms():
        assert Gsm.NORM_SAMPLERS[nn.Linear] is linear_norm_sample
        raise KeyError("an error inside the block")
    assert Gsm.NORM_SAMPLERS[nn.Linear] is compute_linear_norm_sample


def test_cheap_inputs_leave_out_linear_weights_only(make_model):
    model = make_model("full", 0)
    cheap = {id(p) for p in cheap_inputs(model)}
    names = {k for k, p in model.named_parameters() if id(p) in cheap}
    assert "bert.embeddings.word_embeddings.weight" in names and "classifier.bias" in names
    assert not any(k.endswith("dense.weight") or k.endswith("query.weight") or k == "classifier.weight" for k in names)
    assert all(p.requires_grad for p in cheap_inputs(make_model("head", 0)))


def test_ghost_backward_refuses_to_clip_with_a_missing_norm():
    """Here the only cheap tensor is the last layer's bias: the first pass needs no gradient with respect to
    any module input, so no Opacus hook fires and no norm is fresh. Clipping with missing (or last step's)
    norms would release wrongly clipped gradients; ghost_backward raises before any gradient is formed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Tanh(), nn.Linear(4, 2)).double()
    gsm, opt, crit = ghost_setup(model, 1.0, 6)
    gsm.train()
    loss = crit(gsm(torch.randn(6, 4, dtype=torch.float64)), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(RuntimeError, match="no per-example norm for 3 of 3 trainable tensors"):
        ghost_backward(loss)
    assert all(p.grad is None for p in gsm.parameters())
    gsm._close()


@pytest.mark.parametrize(("part", "top_k"), [("full", 0), ("head", 1)], ids=["full", "head+1"])
def test_dp_training_with_fast_ghost_equals_opacus_ghost_step_for_step(make_model, toy_encoded, part, top_k):
    """The whole DP path (Poisson draws, physical-batch splitting, clipping, seeded noise, AdamW) gives the same
    weights with fedpriv's ghost clipping as with Opacus' own."""
    from client.train import DpSettings, TrainSettings, train_local

    base = make_model(part, top_k, dropout=False).double()
    st = TrainSettings(epochs=2, batch_size=8, max_physical_batch_size=5, learning_rate=1e-2, weight_decay=0.01,
                       warmup_ratio=0.0, seed=3)
    out = {}
    for mode in ("ghost", "ghost-opacus"):
        model = copy.deepcopy(base)
        res = train_local(model, toy_encoded, settings=st, device=CPU,
                          dp=DpSettings(noise_multiplier=0.7, clipping_norm=0.05, grad_sample_mode=mode, noise_seed=11))
        out[mode] = ({k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}, res)
    (fast, r_fast), (theirs, r_theirs) = out["ghost"], out["ghost-opacus"]
    assert (r_fast.steps, r_fast.examples_seen) == (r_theirs.steps, r_theirs.examples_seen) and r_fast.steps == 8
    moved = max(float((fast[k] - p.detach()).abs().max()) for k, p in base.named_parameters() if k in fast)
    assert moved > 1e-3
    assert max(float((fast[k] - theirs[k]).abs().max()) for k in fast) < ATOL


class Branchy(nn.Module):
    """Embedding -> optional Linear ``a`` -> Linear ``b``: ``a`` can be left out of a step."""

    def __init__(self):
        super().__init__()
        self.emb, self.a, self.b = nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 2)
        self.use_a = True

    def forward(self, x):
        h = self.emb(x).mean(1)
        return self.b(self.a(h) if self.use_a else h)


def test_ghost_backward_never_reuses_last_steps_norms():
    """Step 1 uses every tensor; step 2 skips ``a``, whose hook then does not fire. Its norm from step 1 is
    still on the tensor: it must not be taken for step 2's (Opacus' own path would silently use it)."""
    torch.manual_seed(0)
    model = Branchy().double()
    gsm, opt, crit = ghost_setup(model, 1.0, 4)
    gsm.train()
    x, y = torch.randint(0, 10, (4, 3)), torch.tensor([0, 1, 0, 1])
    ghost_backward(crit(gsm(x), y))  # step 1: every norm fresh
    assert all(p._norm_sample is not None for p in gsm.trainable_parameters)
    model.use_a = False
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="no per-example norm for 2 of 5 trainable tensors"):
        ghost_backward(crit(gsm(x), y))
    gsm._close()


def test_ghost_backward_refuses_shared_trainable_tensors():
    """Opacus refuses tying between two norm-sampled modules at forward time, but not a Linear bias shared
    with a LayerNorm weight (per-sample-gradient module): each would report a norm of its own part only."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    model[1].weight = model[0].bias  # tied
    gsm, opt, crit = ghost_setup(model, 1.0, 3)
    gsm.train()
    with pytest.raises(RuntimeError, match=r"trainable tensor _module\.1\.weight is also _module\.0\.bias"):
        ghost_backward(crit(gsm(torch.randn(3, 4, dtype=torch.float64)), torch.tensor([0, 1, 2])))
    gsm._close()


def test_ghost_backward_with_only_bias_free_linears_aims_at_every_tensor_and_matches_opacus():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Tanh(), nn.Linear(5, 2, bias=False)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    grads = []
    for ours in (True, False):
        gsm, opt, crit = ghost_setup(copy.deepcopy(base), 0.1, 6)
        gsm.train()
        loss = crit(gsm(x), y)
        ghost_backward(loss) if ours else loss.backward()
        grads.append([p.grad.clone() for p in gsm.parameters()])
        gsm._close()
    assert all(torch.allclose(a, b, atol=ATOL, rtol=0) for a, b in zip(*grads, strict=True))


def test_fast_linear_norms_nests_and_restores_once():
    from opacus.grad_sample import GradSampleModuleFastGradientClipping as Gsm
    from opacus.grad_sample.linear import compute_linear_norm_sample

    with fast_linear_norms():
        with fast_linear_norms():
            assert Gsm.NORM_SAMPLERS[nn.Linear] is linear_norm_sample
        assert Gsm.NORM_SAMPLERS[nn.Linear] is linear_norm_sample  # the outer block still needs it
    assert Gsm.NORM_SAMPLERS[nn.Linear] is compute_linear_norm_sample


def test_unknown_grad_sample_mode_is_an_error(make_model, toy_encoded):
    from client.train import DpSettings, TrainSettings, train_local

    with pytest.raises(ValueError, match="grad_sample_mode must be one of ghost, ghost-opacus, hooks; got 'ghostx'"):
        train_local(make_model("full"), toy_encoded, device=CPU,
                    settings=TrainSettings(epochs=1, batch_size=8, max_physical_batch_size=8, learning_rate=1e-3,
                                           weight_decay=0.0, warmup_ratio=0.0, seed=0),
                    dp=DpSettings(noise_multiplier=1.0, clipping_norm=1.0, grad_sample_mode="ghostx", noise_seed=0))
