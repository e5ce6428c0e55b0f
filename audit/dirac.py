"""White-box Dirac gradient canaries, observed at every DP-SGD step: the empirical audit's default attack.

Each canary is a one-token record whose token no other record uses, in a bag-of-tokens linear classifier
with two labels and no bias (``logits = scale * sum_t W[token_t]``). A canary's gradient is therefore
non-zero on its own row of ``W`` only, and large enough that clipping always binds: its clipped gradient is
``C * u`` on that row (``u`` a fixed unit vector set by its label), a *Dirac canary* in the sense of Nasr,
Hayes, Steinke, Balle, Tramèr, Jagielski, Carlini and Terzis (USENIX Security 2023, "Tight Auditing of
Differentially Private Machine Learning"; also Nasr et al., IEEE S&P 2021, "Adversary Instantiation"). With
plain SGD, the update of that row at step ``t``, divided by the step's learning rate and the clipping
norm and rescaled by the expected batch size, is a direct observation

    o_t = b_t + σ ξ_t,   b_t = 1 if the canary was sampled at step t (never when it is left out),  ξ_t ~ N(0, 1)

of the Poisson-subsampled Gaussian mechanism that DP-SGD's accountant analyses. DP-SGD's ε covers every
intermediate model, so an auditor may look at all of them. Scores:

- ``dirac`` (default): the per-step likelihood ratio of "in" against "out",
  ``sum_t log(1 - q + q exp((2 o_t - 1) / (2 σ^2)))``, the Neyman-Pearson test for one canary (Nasr et al.
  2023, Section 5); σ is floored at :data:`SIGMA_FLOOR` so that training without noise still ranks.
- ``dirac-sum``: ``sum_t o_t``, what the final model alone reveals (the same as reading ``W_T - W_0``).

The model trains with fedpriv's own DP-SGD (:func:`client.train.train_local`: Opacus Poisson sampling,
fedpriv's ghost clipping, Gaussian noise from σ that :func:`common.privacy.calibrate_noise_multiplier`
calibrated); only the optimiser is plain SGD (``optimizer="sgd"``) so that updates are linear in the noisy
gradients. Thousands of canaries cost little: the model has ``2 * (vocabulary)`` weights and ghost
clipping never forms per-example gradients. The coin flips, guesses and bound are the one-run audit of
:mod:`audit.onerun` (Steinke, Nasr and Jagielski, NeurIPS 2023).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from client.train import DpSettings, TrainSettings, planned_dp_steps, train_local
from common.data import Encoded

SCORES = ("dirac", "dirac-sum")
SIGMA_FLOOR = 0.05  # the likelihood-ratio score's σ when training ran with less (or no) noise
INPUT_SCALE = 100.0  # token weight in the logits: a canary's raw gradient norm is >= C, so clipping binds
LOGIT_DRIFT = 2.0  # the automatic learning rate keeps a canary's logit gap below about this (no saturation)
BASE_VOCAB = 500  # tokens of the filler records (ids 1..BASE_VOCAB); canaries use the ids after them
BASE_TOKENS = 4  # tokens per filler record

MIN_EXPECTED_BATCH = 20  # below this an empty Poisson batch (a step without a forward pass) becomes likely
ERR_SMALL_BATCH = ("the Dirac audit needs an expected batch of at least {low} records (an empty Poisson batch "
                   "would hide a step); got {value} ({n} records, q={q:.4g}); use more canaries or a larger batch")
ERR_EMPTY_STEP = ("the Dirac audit observed {seen} of {steps} steps: an empty Poisson batch ran no forward "
                  "pass; use more canaries or a larger batch")


@dataclass
class DiracRun:
    """What one Dirac-canary training run gives the auditor."""

    observations: np.ndarray  # float64 [m, T]: o_t per canary and step, in units of the clipping norm
    included: np.ndarray  # bool [m], the coin flips
    labels: np.ndarray  # int64 [m]
    train_examples: int
    sample_rate: float
    steps: int
    learning_rate: float


def _model(vocab: int, watch: np.ndarray):
    """The bag-of-tokens classifier; records the watched rows of its weight before every forward pass."""
    import torch  # heavy third-party import, only when the audit trains
    from torch import nn

    class DiracClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tokens = nn.Embedding(vocab, 2)
            nn.init.zeros_(self.tokens.weight)
            self.watch = torch.as_tensor(watch, dtype=torch.long)
            self.trajectory: list[torch.Tensor] = []

        def forward(self, input_ids, attention_mask, **_unused):
            self.trajectory.append(self.tokens.weight.detach()[self.watch].clone())
            summed = (self.tokens(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)).sum(1)
            return SimpleNamespace(logits=INPUT_SCALE * summed)

    return DiracClassifier()


def make_records(*, canaries: int, base_examples: int, seed: int) -> tuple[Encoded, Encoded, np.ndarray]:
    """Filler records, canary records (one unique token each, random label) and the canaries' coin flips."""
    rng = np.random.default_rng(seed)
    table = rng.integers(0, 2, size=BASE_VOCAB + 1)  # filler label = majority of its tokens' labels
    base_ids = rng.integers(1, BASE_VOCAB + 1, size=(base_examples, BASE_TOKENS))
    base = Encoded(input_ids=[list(map(int, row)) for row in base_ids],
                   labels=(table[base_ids].mean(1) > 0.5).astype(np.int64))
    can = Encoded(input_ids=[[BASE_VOCAB + 1 + j] for j in range(canaries)],
                  labels=rng.integers(0, 2, size=canaries).astype(np.int64))
    included = rng.random(canaries) < 0.5
    return base, can, included


def train_with_canaries(*, canaries: int, base_examples: int, noise_multiplier: float, clipping_norm: float,
                        epochs: int, batch_size: int | None, steps_per_epoch: int,
                        learning_rate: float | None, seed: int, noise_seed: int | None,
                        device) -> DiracRun:
    """Train the Dirac classifier once with fedpriv's DP-SGD and return every canary's per-step observations.

    ``batch_size`` None: ``ceil(n / steps_per_epoch)``, so q = 1/steps_per_epoch. ``learning_rate`` None: the
    largest rate that keeps a canary's logit gap near :data:`LOGIT_DRIFT` (its clipped gradient stays C).
    """
    base, can, included = make_records(canaries=canaries, base_examples=base_examples, seed=seed)
    inc = np.flatnonzero(included)
    train = Encoded(input_ids=base.input_ids + [can.input_ids[i] for i in inc],
                    labels=np.concatenate([base.labels, can.labels[inc]]))
    n = len(train)
    batch = math.ceil(n / steps_per_epoch) if batch_size is None else batch_size
    q, steps = planned_dp_steps(n, batch_size=batch, epochs=epochs)
    expected = int(n * q)  # Opacus divides the noisy sum by this expected batch size
    if expected < MIN_EXPECTED_BATCH:
        raise ValueError(ERR_SMALL_BATCH.format(low=MIN_EXPECTED_BATCH, value=expected, n=n, q=q))
    if learning_rate is None:
        reach = q * steps + 4.0 * noise_multiplier * math.sqrt(steps) + 1.0  # in units of C, per row
        learning_rate = LOGIT_DRIFT * expected / (INPUT_SCALE * math.sqrt(2.0) * clipping_norm * reach)
    model = _model(BASE_VOCAB + 1 + canaries, watch=BASE_VOCAB + 1 + np.arange(canaries))
    settings = TrainSettings(epochs=epochs, batch_size=batch, max_physical_batch_size=n,
                             learning_rate=learning_rate, weight_decay=0.0, warmup_ratio=0.0, seed=seed,
                             optimizer="sgd")
    dp = DpSettings(noise_multiplier=noise_multiplier, clipping_norm=clipping_norm, grad_sample_mode="ghost",
                    noise_seed=noise_seed)
    import torch  # heavy third-party import, only when the audit trains

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-column model gains nothing from intra-op threads; they only spin-wait
    try:
        result = train_local(model, train, settings=settings, device=device, dp=dp)
    finally:
        torch.set_num_threads(threads)
    traj = model.trajectory + [model.tokens.weight.detach()[model.watch].clone()]
    if len(traj) != result.steps + 1:
        raise ValueError(ERR_EMPTY_STEP.format(seen=len(traj) - 1, steps=result.steps))
    rows = np.stack([t.to("cpu").numpy().astype(np.float64) for t in traj], axis=1)  # [m, T + 1, 2]
    delta = np.diff(rows, axis=1)  # [m, T, 2]
    # SGD: Δ_t = -lr_t (clipped sum + noise) / expected; the label's direction u = (e_{1-y} - e_y) / sqrt 2
    # is the clipped gradient's, so -Δ_t · u = lr_t C (b_t + σ ξ_t) / expected. lr_t: client.train's linear
    # decay without warm-up, lr (T - t) / T.
    sign = np.where(can.labels == 1, 1.0, -1.0)[:, None]
    along = sign * (delta[..., 1] - delta[..., 0]) / math.sqrt(2.0)
    lr_t = learning_rate * (steps - np.arange(steps)) / steps
    obs = along * expected / (lr_t[None, :] * clipping_norm)
    return DiracRun(observations=obs, included=included, labels=can.labels, train_examples=n, sample_rate=q,
                    steps=steps, learning_rate=learning_rate)


def dirac_scores(obs: np.ndarray, *, score: str, sample_rate: float, noise_multiplier: float) -> np.ndarray:
    """Per-canary scores from the ``[m, T]`` observations (higher = more likely "in"); see the module doc."""
    if score == "dirac-sum":
        return obs.sum(axis=1)
    if score != "dirac":
        raise ValueError(f"score must be one of {', '.join(SCORES)}; got {score!r}")
    s = max(noise_multiplier, SIGMA_FLOOR)
    q = sample_rate
    stay = math.log1p(-q) if q < 1.0 else -np.inf
    return np.logaddexp(stay, math.log(q) + (2.0 * obs - 1.0) / (2.0 * s * s)).sum(axis=1)

