"""Local training and evaluation on one node: plain AdamW, or Opacus DP-SGD.

DP-SGD (Abadi et al. 2016) as Opacus implements it: Poisson sampling with rate q = 1/ceil(n/B), per-sample
gradient clipping to L2 norm C, Gaussian noise N(0, (σC)^2) added to the summed clipped gradients. Full
fine-tuning uses ghost clipping (Li et al. 2022; ``grad_sample_mode="ghost"``, with the first of its two
backward passes trimmed by :mod:`client.ghost`), the ``head`` and ``lora`` parts use per-sample hooks.
``BatchMemoryManager`` caps the physical batch so memory stays bounded while the
logical (privacy-relevant) batch keeps its expected size B.

This module knows nothing of Flower or of budgets: callers pass the noise multiplier and read back the
mechanism parameters to account for.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from client.ghost import fast_linear_norms, ghost_backward
from common.data import Encoded
from common.inference import forward as _forward
from common.inference import tensors as _tensors

OPTIMIZERS = ("adamw", "sgd")
FEATURE_PHYSICAL_BATCH = 4096  # physical batch on cached features (rows of hidden floats, a few MB at most)


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    batch_size: int
    max_physical_batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float
    seed: int  # shuffling / Poisson sampling seed
    optimizer: str = "adamw"  # "adamw", or "sgd" (plain SGD: the empirical audit's white-box canaries need it)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {self.optimizer!r}")


@dataclass(frozen=True)
class DpSettings:
    noise_multiplier: float
    clipping_norm: float
    grad_sample_mode: str  # "ghost" (fedpriv's trimmed ghost clipping), "ghost-opacus" (Opacus' own) or "hooks"
    noise_seed: int | None  # None: noise generator seeded from OS entropy


@dataclass
class TrainResult:
    loss: float  # mean training loss over the examples seen
    accuracy: float  # training accuracy over the examples seen
    examples_seen: int
    steps: int  # optimizer steps (logical batches; for DP, Poisson draws)
    sample_rate: float  # q, DP only (0 otherwise)
    seconds: float


def _schedule(optimizer, total_steps: int, warmup_ratio: float):
    import torch

    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _frozen_encoder(model) -> bool:
    """Only the classifier trains: the encoder is a fixed feature map (run in eval mode, no dropout)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return bool(names) and all(n.removeprefix("_module.").startswith("classifier.") for n in names)


def train_local(model, enc: Encoded, *, settings: TrainSettings, device, pad_id: int = 0,
                dp: DpSettings | None = None, features=None) -> TrainResult:
    """Train ``model`` in place on ``enc``. With ``dp`` set, train with Opacus DP-SGD.

    The model's ``requires_grad`` flags decide which tensors train. Returns loss/accuracy over the examples
    the optimiser saw and, for DP, the mechanism parameters (steps, sample rate) to account for.

    ``features`` (float tensor [len(enc), hidden], from :func:`client.features.cached_features`) trains the
    classifier on the frozen encoder's cached outputs instead of running the encoder: allowed only when the
    classifier alone trains. Sampling, clipping, noise and steps are those of the token path (same seeds give
    the same update). When only the classifier trains, the frozen encoder runs in eval mode on both paths.
    """
    import time

    import torch
    from torch.utils.data import DataLoader, TensorDataset

    start = time.perf_counter()
    n = len(enc)
    if n == 0:
        raise ValueError("cannot train on an empty dataset")
    frozen = _frozen_encoder(model)
    if features is not None:
        if not frozen:
            raise ValueError("cached features need a frozen encoder: only the classifier may train")
        if len(features) != n:
            raise ValueError(f"features have {len(features)} rows for {n} examples")
        labels = torch.as_tensor(enc.labels, dtype=torch.long)
        dataset = TensorDataset(features, labels)
        module = model.classifier  # the only trainable part; the features are its input
        # [B, hidden] features need no memory cap: one physical batch per logical batch (same DP step)
        settings = dataclasses.replace(settings, max_physical_batch_size=max(settings.max_physical_batch_size,
                                                                           FEATURE_PHYSICAL_BATCH))

        def fwd(m, xs):
            return m(xs[0].to(device))
    else:
        ids, mask, labels = _tensors(enc, pad_id)
        dataset = TensorDataset(ids, mask, labels)
        module = model

        def fwd(m, xs):
            return _forward(m, xs[0], xs[1], device)
    gen = torch.Generator().manual_seed(settings.seed)
    # Dropout draws from the global generator: seed it too, so a round is reproducible from its seed.
    torch.manual_seed(settings.seed)
    batch = min(settings.batch_size, n)
    loader = DataLoader(dataset, batch_size=batch, shuffle=dp is None, generator=gen, drop_last=False)
    steps_per_epoch = len(loader)
    total_steps = steps_per_epoch * settings.epochs
    params = [p for p in module.parameters() if p.requires_grad]
    opt_class = torch.optim.SGD if settings.optimizer == "sgd" else torch.optim.AdamW
    optimizer = opt_class(params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    model.to(device)
    # A frozen encoder is a fixed feature map: no dropout in it (or before the classifier), so the token path
    # and the cached-feature path compute the same features. Dropout has no parameters: DP is unaffected.
    # The classifier stays in training mode (Opacus captures activations only in training mode).
    model.train()
    if frozen:  # everything below the classifier in eval mode; the root stays in training mode for Opacus
        for child in model.children():
            if child is not model.classifier:
                child.eval()
    loss_sum, correct, seen = 0.0, 0, 0

    if dp is None:
        scheduler = _schedule(optimizer, total_steps, settings.warmup_ratio)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
        phys = settings.max_physical_batch_size
        for _ in range(settings.epochs):
            for *b_xs, b_y in loader:
                optimizer.zero_grad(set_to_none=True)
                bs = len(b_y)
                for lo in range(0, bs, phys):
                    y = b_y[lo: lo + phys].to(device)
                    logits = fwd(module, [x[lo: lo + phys] for x in b_xs])
                    loss = loss_fn(logits, y)
                    (loss / bs).backward()
                    loss_sum += float(loss.detach())
                    correct += int((logits.argmax(-1) == y).sum())
                    seen += len(y)
                optimizer.step()
                scheduler.step()
        return TrainResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1), examples_seen=seen,
                           steps=total_steps, sample_rate=0.0, seconds=time.perf_counter() - start)

    import warnings

    from opacus import PrivacyEngine
    from opacus.utils.batch_memory_manager import BatchMemoryManager

    with warnings.catch_warnings():
        # Known, understood messages only: the noise source is documented in the README (no torchcsprng),
        # and the backward-hook notice is Opacus' per-sample machinery on frozen inputs.
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        warnings.filterwarnings("ignore", message=".*Full backward hook is firing.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        return _train_dp(module, fwd, loader, optimizer, settings=settings, device=device, dp=dp, start=start,
                         steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                         PrivacyEngine=PrivacyEngine, BatchMemoryManager=BatchMemoryManager)


def _train_dp(model, fwd, loader, optimizer, *, settings: TrainSettings, device, dp: DpSettings, start: float,
              steps_per_epoch: int, total_steps: int, PrivacyEngine, BatchMemoryManager) -> TrainResult:  # noqa: N803
    import time
    from contextlib import nullcontext

    import torch


    loss_sum, correct, seen = 0.0, 0, 0

    noise_gen = torch.Generator(device=device)
    seed = dp.noise_seed if dp.noise_seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
    noise_gen.manual_seed(seed)
    engine = PrivacyEngine(accountant="rdp", secure_mode=False)
    criterion = torch.nn.CrossEntropyLoss(reduction="mean")
    # "ghost": Opacus' ghost clipping with client.ghost's trimmed first pass and Linear norms;
    # "ghost-opacus": Opacus' own two passes (benchmarks compare the two side by side).
    modes = {"ghost": "ghost", "ghost-opacus": "ghost", "hooks": "hooks"}
    if dp.grad_sample_mode not in modes:
        raise ValueError(f"grad_sample_mode must be one of {', '.join(modes)}; got {dp.grad_sample_mode!r}")
    fast_ghost = dp.grad_sample_mode == "ghost"
    opacus_mode = modes[dp.grad_sample_mode]
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        criterion=criterion,
        data_loader=loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.clipping_norm,
        poisson_sampling=True,
        noise_generator=noise_gen,
        grad_sample_mode=opacus_mode,
    )
    if opacus_mode == "ghost":
        private_model, dp_optimizer, dp_criterion, dp_loader = wrapped
    else:
        private_model, dp_optimizer, dp_loader = wrapped
        dp_criterion = criterion
    sample_rate = 1.0 / steps_per_epoch
    scheduler = _schedule(dp_optimizer.original_optimizer, total_steps, settings.warmup_ratio)
    with BatchMemoryManager(data_loader=dp_loader, max_physical_batch_size=settings.max_physical_batch_size,
                            optimizer=dp_optimizer) as mem_loader, \
            (fast_linear_norms() if fast_ghost else nullcontext()):
        for _ in range(settings.epochs):
            for *b_xs, b_y in mem_loader:
                if len(b_y) == 0:
                    # An empty Poisson draw still makes a noisy step (zero gradient + noise), as the analysis
                    # assumes: skipping it would reveal that no record was drawn, which a neighbouring dataset
                    # with one more record could change.
                    if _noise_only_step(dp_optimizer):
                        scheduler.step()
                    continue
                dp_optimizer.zero_grad(set_to_none=True)
                y = b_y.to(device)
                logits = fwd(private_model, b_xs)
                loss = dp_criterion(logits, y)
                if fast_ghost:
                    ghost_backward(loss)  # Opacus' two passes without the discarded weight gradients
                else:
                    loss.backward()
                dp_optimizer.step()
                if not dp_optimizer._is_last_step_skipped:
                    scheduler.step()
                loss_sum += float(loss.detach()) * len(y)
                correct += int((logits.argmax(-1) == y).sum())
                seen += len(y)
    # Detach Opacus hooks so the caller gets back a plain module it can read weights from.
    if hasattr(private_model, "_close"):
        private_model._close()
    return TrainResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1), examples_seen=seen,
                       steps=total_steps, sample_rate=sample_rate, seconds=time.perf_counter() - start)


def grad_sample_mode_for(train_part: str, top_k_layers: int = 0) -> str:
    """Opacus per-sample machinery per trainable part: ghost clipping (per-sample norms without per-sample
    gradients) wherever encoder layers train, hooks for the classifier/pooler alone and for LoRA adapters.
    Measured (benchmarks/dp_overhead.py, MiniLM): head + 2 layers ghost 0.75x throughput and 1.12x memory vs
    hooks 0.66x and 1.80x."""
    if train_part == "full" or (train_part == "head" and top_k_layers > 0):
        return "ghost"
    return "hooks"


def _noise_only_step(dp_optimizer) -> bool:
    """The DP step of an empty logical batch: every trainable tensor gets Gaussian noise (σ·C, scaled like any
    other step) and the optimizer steps. Returns False when Opacus' batch splitter marked this physical batch
    as one to accumulate rather than step on (never for an empty logical batch, which is one physical batch)."""
    import torch

    if dp_optimizer._check_skip_next_step():
        dp_optimizer._is_last_step_skipped = True
        return False
    for p in dp_optimizer.params:
        p.summed_grad = torch.zeros_like(p)
    dp_optimizer.add_noise()
    dp_optimizer.scale_grad()
    if dp_optimizer.step_hook:
        dp_optimizer.step_hook(dp_optimizer)
    dp_optimizer._is_last_step_skipped = False
    dp_optimizer.original_optimizer.step()
    for p in dp_optimizer.params:
        p.grad, p.summed_grad = None, None
    return True


def planned_dp_steps(n: int, *, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, number of Poisson draws) of one round on ``n`` examples: q = 1/ceil(n/B)."""
    for name, value in (("n", n), ("batch_size", batch_size), ("epochs", epochs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    per_epoch = math.ceil(n / min(batch_size, n))
    return 1.0 / per_epoch, per_epoch * epochs
