"""Local training: plain AdamW learns; DP-SGD with noise 0 and an unbinding clip equals it; a binding clip
clips every per-sample gradient; the planned DP mechanism matches what training runs."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from client.train import DpSettings, TrainSettings, grad_sample_mode_for, planned_dp_steps, train_local
from common.data import Encoded
from common.inference import forward, predict, tensors

CPU = torch.device("cpu")
LR = 1e-2
# DP with noise 0 and an unbinding clip vs plain training, same full batch, float64: the two paths differ only
# in summation order (per-sample einsum + sum vs one matmul), measured ~1e-14; 1e-10 leaves room and is still
# six orders of magnitude below one AdamW step (~LR).
EQUIV_ATOL = 1e-10
OPACUS_NORM_EPS = 1e-6  # Opacus clips with factor min(1, C / (||g_i|| + 1e-6))
UNBINDING_CLIP = 1e6
BINDING_CLIP = 1e-3


def settings(n: int, **kw) -> TrainSettings:
    base = dict(epochs=1, batch_size=n, max_physical_batch_size=n, learning_rate=LR, weight_decay=0.01,
                warmup_ratio=0.0, seed=0)
    return TrainSettings(**(base | kw))


def dp(clip: float, noise: float = 0.0, mode: str = "hooks", seed: int | None = 0) -> DpSettings:
    return DpSettings(noise_multiplier=noise, clipping_norm=clip, grad_sample_mode=mode, noise_seed=seed)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert list(a) == list(b)
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def mean_loss(model, enc: Encoded) -> float:
    res = predict(model, enc, device=CPU, batch_size=64)
    return res.loss_sum / res.num_examples


# --------------------------------------------------------------------------------------------- plain


def test_plain_training_reduces_loss(make_model, toy_encoded):
    model = make_model("head", 1)
    before = mean_loss(model, toy_encoded)
    torch.manual_seed(0)  # dropout
    res = train_local(model, toy_encoded, settings=settings(len(toy_encoded), epochs=12, batch_size=8,
                                                            learning_rate=5e-3, warmup_ratio=0.1),
                      device=CPU)
    after = mean_loss(model, toy_encoded)
    assert after < 0.5 * before, (before, after)  # measured: 0.69 -> < 0.1
    assert predict(model, toy_encoded, device=CPU).y_pred.tolist() == toy_encoded.labels.tolist()
    assert (res.examples_seen, res.steps, res.sample_rate) == (12 * 32, 12 * 4, 0.0)
    assert 0.0 <= res.accuracy <= 1.0 and res.loss > 0


def test_physical_batches_do_not_change_the_step(make_model, toy_encoded):
    """Gradient accumulation over physical batches gives the same update as one logical batch."""
    base = make_model("head", 0, dropout=False).double()
    n = len(toy_encoded)
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    train_local(a, toy_encoded, settings=settings(n), device=CPU)
    train_local(b, toy_encoded, settings=settings(n, max_physical_batch_size=5), device=CPU)
    assert max_abs_diff(trainable(a), trainable(b)) < EQUIV_ATOL


@pytest.mark.parametrize("use_dp", [False, True], ids=["plain", "dp"])
def test_empty_dataset_raises(make_model, use_dp):
    enc = Encoded(input_ids=[], labels=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="cannot train on an empty dataset"):
        train_local(make_model("head"), enc, settings=settings(1), device=CPU, dp=dp(1.0) if use_dp else None)


# --------------------------------------------------------------------------------------------- DP = plain


@pytest.mark.parametrize(("part", "mode"),
                         [("head", "hooks"), ("classifier", "hooks"), ("lora", "hooks"), ("full", "ghost")])
def test_dp_with_no_noise_and_unbinding_clip_equals_plain_training(make_model, toy_encoded, part, mode):
    """Opacus' ``_compare_to_vanilla``, on the exact batches.

    Plain training shuffles and DP samples by Poisson draws, so both run full-batch steps: batch_size = n
    makes the plain loader yield every example each step, and Poisson rate q = 1/ceil(n/B) = 1 puts every
    example in every DP draw. float64 and no dropout remove every other source of difference.
    """
    base = make_model(part, 0, dropout=False).double()
    n = len(toy_encoded)
    st = settings(n, epochs=2, warmup_ratio=0.5)
    plain, private = copy.deepcopy(base), copy.deepcopy(base)
    r_plain = train_local(plain, toy_encoded, settings=st, device=CPU)
    r_dp = train_local(private, toy_encoded, settings=st, device=CPU, dp=dp(UNBINDING_CLIP, mode=mode))

    moved = max_abs_diff(trainable(plain), trainable(base))
    assert moved > LR / 2, "training did not move the weights; the comparison would be vacuous"
    assert max_abs_diff(trainable(private), trainable(plain)) < EQUIV_ATOL
    assert type(private) is type(base)  # Opacus' wrapper does not leak out
    assert (r_dp.examples_seen, r_dp.steps, r_dp.sample_rate) == (2 * n, 2, 1.0)
    assert (r_plain.examples_seen, r_plain.steps) == (2 * n, 2)
    assert r_dp.loss == pytest.approx(r_plain.loss, rel=1e-9)
    assert r_dp.accuracy == r_plain.accuracy


# --------------------------------------------------------------------------------------------- binding clip


def per_sample_grads(model, enc: Encoded) -> list[dict[str, torch.Tensor]]:
    """Gradients of each example's loss, one backward pass per example (no Opacus involved)."""
    ids, mask, y = tensors(enc, 0)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(len(enc)):
        length = int(mask[i].sum())
        model.zero_grad(set_to_none=True)
        logits = forward(model, ids[i: i + 1, :length], mask[i: i + 1, :length], CPU)
        torch.nn.functional.cross_entropy(logits, y[i: i + 1]).backward()
        out.append({n: p.grad.detach().clone() for n, p in params.items()})
    model.zero_grad(set_to_none=True)
    return out


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))


def test_binding_clip_matches_clipped_reference_step(make_model, toy_encoded):
    """One DP step with a clip far below every per-sample gradient norm equals AdamW on the mean of the
    per-sample gradients each clipped to norm C (computed here without Opacus), and differs from the
    unclipped step: the clip binds and is applied per sample."""
    base = make_model("head", 0, dropout=False).double()
    with torch.no_grad():  # spread the predictions so that per-sample gradient norms differ
        base.classifier.weight.add_(torch.randn(base.classifier.weight.shape, generator=torch.Generator().manual_seed(0),
                                                dtype=torch.float64))
    base.train()
    n = len(toy_encoded)
    grads = per_sample_grads(base, toy_encoded)
    norms = [global_norm(g) for g in grads]
    assert min(norms) > 10 * BINDING_CLIP, "the clip must bind for every example"
    assert max(norms) / min(norms) > 1.5, "equal norms would make clipping a pure rescale, invisible to Adam"

    def reference(clip: float | None):
        model = copy.deepcopy(base)
        params = {k: p for k, p in model.named_parameters() if p.requires_grad}
        opt = torch.optim.AdamW(list(params.values()), lr=LR, weight_decay=0.01)
        for k, p in params.items():
            factors = [1.0 if clip is None else min(1.0, clip / (nm + OPACUS_NORM_EPS)) for nm in norms]
            p.grad = sum(f * g[k] for f, g in zip(factors, grads, strict=True)) / n
        opt.step()
        return trainable(model)

    private = copy.deepcopy(base)
    train_local(private, toy_encoded, settings=settings(n), device=CPU, dp=dp(BINDING_CLIP))
    clipped, unclipped = reference(BINDING_CLIP), reference(None)
    assert max_abs_diff(trainable(private), clipped) < EQUIV_ATOL
    assert max_abs_diff(clipped, unclipped) > 1e3 * EQUIV_ATOL


# Opacus' per-sample hook on the first trainable module (the pooler), whose inputs need no grad: understood.
@pytest.mark.filterwarnings("ignore:Full backward hook is firing when gradients are computed with respect to "
                            "module outputs:UserWarning")
def test_opacus_clips_every_per_sample_gradient_of_the_head(make_model, toy_encoded):
    """With Opacus' GradSampleModule and DPOptimizer on the trainable head, each example's clipped gradient
    has L2 norm <= C, while its unclipped norm was > C."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model = GradSampleModule(make_model("head", 0, dropout=False).double())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=0.0, max_grad_norm=BINDING_CLIP,
                      expected_batch_size=1)
    ids, mask, y = tensors(toy_encoded, 0)
    model.train()
    for i in range(len(toy_encoded)):
        opt.zero_grad(set_to_none=True)
        logits = forward(model, ids[i: i + 1], mask[i: i + 1], CPU)
        torch.nn.functional.cross_entropy(logits, y[i: i + 1]).backward()
        unclipped = math.sqrt(sum(float((p.grad_sample ** 2).sum()) for p in params))
        assert unclipped > BINDING_CLIP  # the clip binds
        opt.pre_step()  # clip, add (zero) noise, scale by 1 / expected batch size
        clipped = math.sqrt(sum(float((p.grad ** 2).sum()) for p in params))
        assert clipped <= BINDING_CLIP
        assert clipped == pytest.approx(BINDING_CLIP * unclipped / (unclipped + OPACUS_NORM_EPS), rel=1e-9)


# --------------------------------------------------------------------------------------------- DP mechanism


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "q", "steps"),
    [(100, 10, 1, 1 / 10, 10), (101, 10, 2, 1 / 11, 22), (5, 64, 3, 1.0, 3), (1, 1, 1, 1.0, 1)],
)
def test_planned_dp_steps(n, batch, epochs, q, steps):
    assert planned_dp_steps(n, batch_size=batch, epochs=epochs) == (q, steps)


@pytest.mark.parametrize(("kw", "msg"), [({"n": 0}, "n must be >= 1, got 0"),
                                         ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
                                         ({"epochs": 0}, "epochs must be >= 1, got 0")])
def test_planned_dp_steps_rejects_empty_plans(kw, msg):
    args = {"n": 10, "batch_size": 4, "epochs": 1} | kw
    with pytest.raises(ValueError, match=msg):
        planned_dp_steps(args.pop("n"), **args)


def test_dp_training_runs_the_planned_mechanism_and_is_seeded(make_model, toy_encoded):
    n = len(toy_encoded)
    st = settings(n, batch_size=10, max_physical_batch_size=4, epochs=2)
    q, steps = planned_dp_steps(n, batch_size=10, epochs=2)
    runs = []
    for noise_seed in (5, 5, 6):
        model = make_model("head", 0, dropout=False)
        res = train_local(model, toy_encoded, settings=st, device=CPU, dp=dp(1.0, noise=1.0, seed=noise_seed))
        assert (res.sample_rate, res.steps) == (q, steps) == (0.25, 8)
        runs.append(trainable(model))
    assert max_abs_diff(runs[0], runs[1]) == 0.0  # same sampling seed and noise seed: same result
    assert max_abs_diff(runs[0], runs[2]) > 0.0  # the noise seed matters


def test_dp_batch_sampling_is_secret_unless_the_node_allows_a_fixed_seed() -> None:
    # Amplification by subsampling assumes nobody can predict which records a step used.
    from client.app import _sampling_seed
    from common.config import NodeConfig, RunConfig

    def seed(cfg, node, *, run="run-a", private=True):
        return _sampling_seed(cfg, node, run=run, name="site-a", server_round=1, private=private)

    deployed, strict, lenient = RunConfig(), NodeConfig(), NodeConfig(allow_fixed_noise_seed=True)
    assert len({seed(deployed, strict) for _ in range(8)}) > 1  # noise-seed -1: OS entropy
    fixed = RunConfig(noise_seed=0)
    assert len({seed(fixed, strict) for _ in range(8)}) > 1  # the coordinator's seed is not the node's choice
    assert seed(fixed, lenient) == seed(fixed, lenient)  # reproducible where the node allows it ...
    assert seed(fixed, lenient, run="run-a") != seed(fixed, lenient, run="run-b")  # ... and never reused
    # without DP the sampling is reproducible from the run seed alone: the same in every run
    assert seed(deployed, strict, private=False) == seed(deployed, strict, run="run-b", private=False)


@pytest.mark.parametrize("part", ["head", "full"])
def test_empty_poisson_batches_still_make_a_noisy_step(part, make_model, tokenizer) -> None:
    """Every planned Poisson draw is a noisy optimizer step, also an empty one (q = 1/8 over 8 examples makes
    about a third of the draws empty); skipping them would reveal that no record was drawn."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from common.data import encode
    from simulations.synthetic import make_synthetic

    enc = encode(make_synthetic(8, seed=0), tokenizer, max_length=16)
    steps = []
    handle = register_optimizer_step_post_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        res = train_local(make_model(part, 0), enc, device=CPU,
                          settings=settings(1, epochs=3, max_physical_batch_size=4, learning_rate=1e-3,
                                            weight_decay=0.0, seed=1),
                          dp=dp(1.0, noise=1.0, mode=grad_sample_mode_for(part)))
    finally:
        handle.remove()
    assert res.steps == 24 and len(steps) == 24
    assert res.examples_seen < 24 + 12  # many draws were empty (expected 24 * (7/8)^8 ~ 8)


def test_ghost_clipping_wherever_encoder_layers_train(make_model, tokenizer) -> None:
    from common.data import encode
    from common.model import trainable_state
    from simulations.synthetic import make_synthetic

    assert [grad_sample_mode_for(p, k) for p, k in (("full", 0), ("head", 1), ("head", 0), ("lora", 0),
                                                   ("classifier", 0))] == ["ghost", "ghost", "hooks", "hooks", "hooks"]
    model = make_model("head", 1)
    before = trainable_state(model)
    res = train_local(model, encode(make_synthetic(32, seed=0), tokenizer, max_length=16), device=CPU,
                      settings=settings(8, learning_rate=1e-3, weight_decay=0.0),
                      dp=dp(1.0, noise=1.0, mode=grad_sample_mode_for("head", 1)))
    after = trainable_state(model)
    assert res.steps == 4 and all(np.isfinite(v).all() for v in after.values())
    assert any(not np.array_equal(before[k], after[k]) for k in before if ".layer.1." in k)  # the top layer trained
