"""Empirical privacy audit of a node's DP-SGD training in one run: does the training leak more than it claims?

The audit is the one-run canary test of Steinke, Nasr and Jagielski (NeurIPS 2023, "Privacy Auditing with One
(1) Training Run"; statistics in :mod:`audit.onerun`): ``m`` canaries, each in the training data with
probability 1/2, one training run with fedpriv's own DP-SGD (:func:`client.train.train_local`), a score per
canary, guesses for the top and bottom scores, and a 95% lower bound on ε from the correct guesses. The report
compares it with the claimed ε (the accountant's, or ``claimed_epsilon``) and with the *ceiling*, the bound
all-correct guesses would give:

- ``fail``: lower bound > claim. At 95% confidence the mechanism leaks more than claimed (noise missing or too
  small, a sampling rate larger than the accounted one, clipping skipped).
- ``inconclusive``: ceiling < claim. These settings could never fail the claim; more canaries or guesses can.
- ``pass``: no evidence against the claim. A lower bound certifies nothing: a pass is not a proof of privacy.

Attacks (``score``):

- ``dirac`` / ``dirac-sum`` (default, :mod:`audit.dirac`): white-box gradient canaries observed at every step
  of plain-SGD DP-SGD on a small linear model (Nasr et al. 2021, 2023), thousands of them. Strong enough to
  catch a broken mechanism: with 20,000 canaries training without noise fails even a claim of ε=8.
- ``embedding`` / ``loss``: text canaries in the node's own BERT training (the product's AdamW and model).
  Each canary is a short text of vocabulary words that occur nowhere else in the training data, with a random
  label; ``embedding`` scores how far those words' embedding rows moved (needs ``train_part="full"``),
  ``loss`` scores the drop of the canary's loss (black-box, any part). Much weaker: 200 canaries reach at most
  ε≈3.3, so they are mostly a smoke test of the real model's training path.

Guess counts are fixed before training (never tuned on the outcome), so the 95% level holds as stated.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit.dirac import ERR_SMALL_BATCH, MIN_EXPECTED_BATCH, dirac_scores, make_records, train_with_canaries
from audit.dirac import SCORES as DIRAC_SCORES
from audit.onerun import (
    ERR_GUESSES,
    choose_guesses,
    epsilon_ceiling,
    epsilon_lower_bound,
    guess_and_count,
    p_value,
    verdict,
)
from client.train import DpSettings, TrainSettings, grad_sample_mode_for, planned_dp_steps, train_local
from common.data import Encoded, TextDataset, encode
from common.inference import predict
from common.model import ModelSpec, build_model, choose_device, load_tokenizer
from common.privacy import DpSgdRelease, calibrate_noise_multiplier, compute_epsilon

__all__ = ["SCORES", "AuditResult", "AuditSettings", "epsilon_ceiling", "epsilon_lower_bound", "guess_and_count",
           "make_canaries", "p_value", "plot_scores", "run_audit"]

TEXT_SCORES = ("embedding", "loss")
SCORES = DIRAC_SCORES + TEXT_SCORES
_WORD = re.compile(r"^[a-z]{3,}$")

ERR_SCORE = "score must be one of {choices}; got {value!r}"
ERR_SCORE_PART = ("score 'embedding' needs the word embeddings to train (train_part 'full'); got train_part "
                  "{part!r}. Use --train-part full or --score loss.")
ERR_FEW_WORDS = ("only {have} unused vocabulary words are left for canaries, {need} are needed "
                 "({m} canaries x {t} words); use fewer canaries or fewer words per canary")
ERR_POSITIVE = "{name} (--{flag}) must be > 0; got {value}"
ERR_AT_LEAST = "{name} (--{flag}) must be >= {low}; got {value}"
ERR_CLAIM = "claimed epsilon (--claimed-epsilon) must be > 0; got {value}"
ERR_NOISE = "noise multiplier (--noise-multiplier) must be >= 0; got {value}"
ERR_EPSILON = "epsilon (--epsilon) must be > 0 when no noise multiplier is given; got {value}"
ERR_DELTA = "delta (--delta) must be in (0, 1); got {value}"
ERR_CONFIDENCE_FLAG = "confidence (--confidence) must be in (0, 1); got {value}"
_FLAGS = {"canaries": "canaries", "epochs": "epochs", "batch_size": "batch-size", "learning_rate": "lr",
          "clipping_norm": "clip", "steps_per_epoch": "steps-per-epoch", "base_examples": "examples"}
ERR_DATA = "--data applies to the text scores (embedding, loss); the {score} audit makes its own records"


@dataclass
class Canaries:
    texts: list[str]
    labels: np.ndarray  # int64 [m]
    token_ids: list[list[int]]  # the words' vocabulary ids per canary (each id used by one canary only)
    included: np.ndarray  # bool [m], the coin flips


def make_canaries(tokenizer, m: int, *, num_labels: int, words_per_canary: int, avoid: set[int],
                  seed: int) -> Canaries:
    """``m`` canaries of ``words_per_canary`` unused vocabulary words each, random labels, fair coin flips.

    A word qualifies when it is a lowercase alphabetic whole-word token, not in ``avoid`` (the ids the
    training data uses), and the tokenizer maps it back to that one id.
    """
    rng = np.random.default_rng(seed)
    vocab = tokenizer.get_vocab()
    words = sorted(w for w, i in vocab.items() if _WORD.match(w) and i not in avoid)
    rng.shuffle(words)
    need = m * words_per_canary
    chosen: list[tuple[str, int]] = []
    for w in words:
        ids = tokenizer(w, add_special_tokens=False)["input_ids"]
        if len(ids) == 1 and ids[0] == vocab[w]:
            chosen.append((w, ids[0]))
            if len(chosen) == need:
                break
    if len(chosen) < need:
        raise ValueError(ERR_FEW_WORDS.format(have=len(chosen), need=need, m=m, t=words_per_canary))
    texts, token_ids = [], []
    for c in range(m):
        part = chosen[c * words_per_canary:(c + 1) * words_per_canary]
        texts.append(" ".join(w for w, _ in part))
        token_ids.append([i for _, i in part])
    labels = rng.integers(0, num_labels, size=m).astype(np.int64)
    included = rng.random(m) < 0.5
    return Canaries(texts=texts, labels=labels, token_ids=token_ids, included=included)


# ------------------------------------------------------------------------------------------ the audit


@dataclass
class AuditSettings:
    score: str = "dirac"  # dirac, dirac-sum (gradient canaries) or embedding, loss (text canaries in BERT)
    canaries: int | None = None  # m; default 20000 (dirac) or 200 (text)
    guesses_in: int | None = None  # default: choose_guesses (dirac) or m // 5 (text)
    guesses_out: int | None = None  # default: as guesses_in
    epochs: int | None = None  # default 10 (dirac) or 5 (text)
    batch_size: int | None = None  # default ceil(n / steps_per_epoch) (dirac) or 32 (text)
    steps_per_epoch: int = 4  # dirac only: q = 1/steps_per_epoch when batch_size is None
    base_examples: int = 1000  # dirac only: filler records besides the canaries
    learning_rate: float | None = None  # default: automatic (dirac, see audit.dirac) or 1e-3 (text AdamW)
    words_per_canary: int = 4  # text only
    model: str = "tiny"  # text only
    train_part: str = "full"  # text only
    weight_decay: float = 0.01  # text only (dirac: plain SGD, none)
    max_length: int = 32  # text only
    clipping_norm: float = 1.0
    epsilon: float | None = 8.0  # target ε the noise is calibrated to (ignored when noise_multiplier is set)
    noise_multiplier: float | None = None  # train with this σ instead (0.0 = no noise)
    claimed_epsilon: float | None = None  # the claim audited; default: the accountant's ε of the run
    delta: float = 1e-5
    accountant: str = "prv"
    confidence: float = 0.95
    seed: int = 0  # canaries, coin flips, Poisson sampling
    noise_seed: int | None = None  # None: DP noise from OS entropy
    device: str = "auto"

    def check(self) -> None:
        """Reject bad settings before any training; the message names the parameter, range and value."""
        if self.score not in SCORES:
            raise ValueError(ERR_SCORE.format(choices=", ".join(SCORES), value=self.score))
        if self.score == "embedding" and self.train_part != "full":
            raise ValueError(ERR_SCORE_PART.format(part=self.train_part))
        for name in ("canaries", "epochs", "batch_size", "learning_rate", "clipping_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(ERR_POSITIVE.format(name=name, flag=_FLAGS[name], value=value))
        if self.steps_per_epoch < 1:
            raise ValueError(ERR_AT_LEAST.format(name="steps_per_epoch", flag=_FLAGS["steps_per_epoch"], low=1, value=self.steps_per_epoch))
        if self.base_examples < 0:
            raise ValueError(ERR_AT_LEAST.format(name="base_examples", flag=_FLAGS["base_examples"], low=0, value=self.base_examples))
        if self.noise_multiplier is not None and not self.noise_multiplier >= 0:
            raise ValueError(ERR_NOISE.format(value=self.noise_multiplier))
        if self.noise_multiplier is None and (self.epsilon is None or not self.epsilon > 0):
            raise ValueError(ERR_EPSILON.format(value=self.epsilon))
        if self.claimed_epsilon is not None and not self.claimed_epsilon > 0:
            raise ValueError(ERR_CLAIM.format(value=self.claimed_epsilon))
        if not 0.0 < self.delta < 1.0:
            raise ValueError(ERR_DELTA.format(value=self.delta))
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(ERR_CONFIDENCE_FLAG.format(value=self.confidence))
        m = self.resolved_canaries
        k_in, k_out = self.guesses_in, self.guesses_out
        if k_in is not None or k_out is not None:
            k_in = k_in if k_in is not None else (k_out or 0)
            k_out = k_out if k_out is not None else k_in
            if k_in < 0 or k_out < 0 or not (1 <= k_in + k_out <= m):
                raise ValueError(ERR_GUESSES.format(r=k_in + k_out, m=m, k_in=k_in, k_out=k_out))

    @property
    def dirac(self) -> bool:
        return self.score in DIRAC_SCORES

    @property
    def resolved_canaries(self) -> int:
        return self.canaries if self.canaries is not None else (20000 if self.dirac else 200)


@dataclass
class AuditResult:
    settings: dict[str, Any]
    score: str
    canaries: int
    included: int
    train_examples: int
    guesses: int
    correct: int
    epsilon_lower_bound: float  # 95% (``confidence``) lower bound on the ε of what ran
    epsilon_claimed: float  # the claim audited (inf: no noise and no claim)
    epsilon_ceiling: float  # the bound if every guess were right: the most these settings can show
    verdict: str  # pass, fail or inconclusive (audit.onerun.verdict)
    theoretical_epsilon: float | None  # the accountant's ε of what ran; None: no noise, no finite ε
    noise_multiplier: float
    sample_rate: float
    steps: int
    seconds: float
    scores_in: list[float] = field(default_factory=list)
    scores_out: list[float] = field(default_factory=list)

    @property
    def consistent(self) -> bool:
        """The lower bound does not exceed the claim (kept for callers of the first version)."""
        return self.verdict != "fail"

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if math.isinf(self.epsilon_claimed):
            d["epsilon_claimed"] = None  # JSON has no infinity: no noise and no claim
        d["consistent"] = self.consistent
        d["method"] = ("one-run canary audit (Steinke, Nasr, Jagielski, NeurIPS 2023)"
                       + (" with Dirac gradient canaries observed at every step (Nasr et al. 2021, 2023)"
                          if self.score in DIRAC_SCORES else " with text canaries"))
        d["note"] = ("fail: at 95% confidence the training leaks more than its claimed epsilon; inconclusive: "
                     "the ceiling is below the claim, so these settings cannot fail it; pass: no evidence "
                     "against the claim -- an empirical lower bound does not certify privacy")
        return d


def _mechanism(s: AuditSettings, n: int, batch_size: int, epochs: int) -> tuple[float, int, float, float | None]:
    """(q, steps, σ, accountant ε of the run) for ``n`` records: σ as given or calibrated to ``s.epsilon``."""
    q, steps = planned_dp_steps(n, batch_size=batch_size, epochs=epochs)
    if s.noise_multiplier is not None:
        sigma = float(s.noise_multiplier)
    else:
        sigma = calibrate_noise_multiplier(target_epsilon=s.epsilon, delta=s.delta, sample_rate=q, steps=steps,
                                           accountant=s.accountant)
    if sigma == 0:
        return q, steps, sigma, None
    release = [DpSgdRelease(noise_multiplier=sigma, sample_rate=q, steps=steps)]
    try:
        eps = compute_epsilon(release, delta=s.delta, accountant=s.accountant)
    except ValueError:  # PRV's grid cannot take very little noise; RDP can (and is an upper bound too)
        eps = compute_epsilon(release, delta=s.delta, accountant="rdp")
    return q, steps, sigma, eps


def _report(s: AuditSettings, *, scores: np.ndarray, included: np.ndarray, claimed: float, **run: Any
            ) -> AuditResult:
    m = len(scores)
    if s.guesses_in is None and s.guesses_out is None:
        k = (choose_guesses(m, claimed_epsilon=claimed, delta=s.delta, confidence=s.confidence) if s.dirac
             else m // 5)
        k_in = k_out = k
    else:
        k_in = s.guesses_in if s.guesses_in is not None else s.guesses_out
        k_out = s.guesses_out if s.guesses_out is not None else s.guesses_in
    r, v = guess_and_count(scores, included, k_in=k_in, k_out=k_out, seed=s.seed + 1)
    lb = epsilon_lower_bound(m, r, v, delta=s.delta, confidence=s.confidence)
    ceiling = epsilon_ceiling(m, r, delta=s.delta, confidence=s.confidence)
    return AuditResult(settings=asdict(s), score=s.score, canaries=m, included=int(included.sum()), guesses=r,
                       correct=v, epsilon_lower_bound=lb, epsilon_claimed=claimed, epsilon_ceiling=ceiling,
                       verdict=verdict(lower_bound=lb, claimed=claimed, ceiling=ceiling),
                       scores_in=[float(x) for x in scores[included]],
                       scores_out=[float(x) for x in scores[~included]], **run)


def run_audit(s: AuditSettings, *, base: TextDataset | None = None, progress=None) -> AuditResult:
    """Train once with canaries, score them and audit the claim; ``base`` is the text scores' training data."""
    s.check()
    if s.dirac:
        return _run_dirac(s, progress=progress)
    if base is None:
        raise ValueError(f"score {s.score!r} needs base training data")
    return _run_text(s, base=base, progress=progress)


def _run_dirac(s: AuditSettings, *, progress=None) -> AuditResult:
    start = time.perf_counter()
    m, epochs = s.resolved_canaries, s.epochs or 10
    # The record count depends on the coin flips, known before training: draw them once to size the run.
    base_rec, _, included = make_records(canaries=m, base_examples=s.base_examples, seed=s.seed)
    n = len(base_rec) + int(included.sum())
    batch = s.batch_size or math.ceil(n / s.steps_per_epoch)
    q = planned_dp_steps(n, batch_size=batch, epochs=epochs)[0]
    if int(n * q) < MIN_EXPECTED_BATCH:  # refused before training, as audit.dirac would
        raise ValueError(ERR_SMALL_BATCH.format(low=MIN_EXPECTED_BATCH, value=int(n * q), n=n, q=q))
    q, steps, sigma, eps = _mechanism(s, n, batch, epochs)
    claimed = s.claimed_epsilon if s.claimed_epsilon is not None else (eps if eps is not None else math.inf)
    if progress is not None:
        progress(f"training on {n} records ({int(included.sum())} of {m} Dirac canaries in), σ={sigma:.4g}, "
                 f"q={q:.4g}, {steps} steps, claim ε={claimed:.4g}")
    device = choose_device(s.device)
    run = train_with_canaries(canaries=m, base_examples=s.base_examples, noise_multiplier=sigma,
                              clipping_norm=s.clipping_norm, epochs=epochs, batch_size=batch,
                              steps_per_epoch=s.steps_per_epoch, learning_rate=s.learning_rate, seed=s.seed,
                              noise_seed=s.noise_seed, device=device)
    scores = dirac_scores(run.observations, score=s.score, sample_rate=run.sample_rate, noise_multiplier=sigma)
    return _report(s, scores=scores, included=run.included, claimed=claimed, train_examples=run.train_examples,
                   theoretical_epsilon=eps, noise_multiplier=sigma, sample_rate=run.sample_rate,
                   steps=run.steps, seconds=time.perf_counter() - start)


def _embedding_rows(model):
    base = getattr(model, "bert", None) or model.base_model
    return base.embeddings.word_embeddings.weight


def _canary_losses(model, enc: Encoded, device) -> np.ndarray:
    res = predict(model, enc, device=device)
    # per-example loss of the canary's own label, from the predicted class probabilities
    probs = np.clip(res.scores[np.arange(len(enc)), enc.labels], 1e-12, 1.0)
    return -np.log(probs)


def _run_text(s: AuditSettings, *, base: TextDataset, progress=None) -> AuditResult:
    """Text canaries in the node's BERT training (AdamW, the product's model and train part)."""
    import copy

    import torch  # heavy third-party import, only when the audit trains

    start = time.perf_counter()
    m, epochs, batch_size = s.resolved_canaries, s.epochs or 5, s.batch_size or 32
    device = choose_device(s.device)
    tok = load_tokenizer(s.model)
    labels = tuple(base.label_names)
    base_enc = encode(base, tok, max_length=s.max_length)
    used = {i for ids in base_enc.input_ids for i in ids}
    can = make_canaries(tok, m, num_labels=len(labels), words_per_canary=s.words_per_canary, avoid=used,
                        seed=s.seed)
    can_ds = TextDataset(texts=can.texts, labels=can.labels, label_names=list(labels))
    can_enc = encode(can_ds, tok, max_length=s.max_length)
    inc = np.flatnonzero(can.included)
    train = Encoded(input_ids=base_enc.input_ids + [can_enc.input_ids[i] for i in inc],
                    labels=np.concatenate([base_enc.labels, can_enc.labels[inc]]))
    n = len(train)
    sample_rate, steps, sigma, eps = _mechanism(s, n, batch_size, epochs)
    claimed = s.claimed_epsilon if s.claimed_epsilon is not None else (eps if eps is not None else math.inf)

    model = build_model(ModelSpec(source=s.model, labels=labels, train_part=s.train_part, top_k_layers=0))
    model.to(device)
    before = _embedding_rows(model).detach().to("cpu", copy=True) if s.score == "embedding" else None
    initial = copy.deepcopy(model) if s.score == "loss" else None
    if progress is not None:
        progress(f"training on {n} examples ({len(inc)} of {m} canaries in), σ={sigma:.4g}, "
                 f"q={sample_rate:.4g}, {steps} steps, claim ε={claimed:.4g}")
    settings = TrainSettings(epochs=epochs, batch_size=batch_size, max_physical_batch_size=batch_size,
                             learning_rate=s.learning_rate or 1e-3, weight_decay=s.weight_decay,
                             warmup_ratio=0.0, seed=s.seed)
    dp = DpSettings(noise_multiplier=sigma, clipping_norm=s.clipping_norm,
                    grad_sample_mode=grad_sample_mode_for(s.train_part), noise_seed=s.noise_seed)
    train_local(model, train, settings=settings, device=device, dp=dp)

    if s.score == "embedding":
        after = _embedding_rows(model).detach().to("cpu")
        moved = torch.linalg.vector_norm(after - before, dim=1).numpy().astype(np.float64)
        scores = np.array([moved[ids].mean() for ids in can.token_ids])
    else:
        scores = _canary_losses(initial, can_enc, device) - _canary_losses(model, can_enc, device)
    return _report(s, scores=scores, included=can.included, claimed=claimed, train_examples=n,
                   theoretical_epsilon=eps, noise_multiplier=sigma, sample_rate=sample_rate, steps=steps,
                   seconds=time.perf_counter() - start)


def plot_scores(res: AuditResult, out: Path) -> Path:
    """Histogram of the canary scores, included vs left out, with bound, ceiling, claim and verdict in the title (headless, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.0))
    ax = fig.add_subplot()
    both = np.array(res.scores_in + res.scores_out)
    bins = np.linspace(both.min(), both.max() + 1e-12, 40) if len(both) else 10
    ax.hist(res.scores_out, bins=bins, alpha=0.6, label=f"left out ({len(res.scores_out)})")
    ax.hist(res.scores_in, bins=bins, alpha=0.6, label=f"included ({len(res.scores_in)})")
    claim = "none (no noise)" if math.isinf(res.epsilon_claimed) else f"{res.epsilon_claimed:.2f}"
    ax.set_title(f"canary scores: ε lower bound {res.epsilon_lower_bound:.2f} (95%), ceiling "
                 f"{res.epsilon_ceiling:.2f}, claimed ε {claim}: {res.verdict}", fontsize=9)
    ax.set_xlabel(f"score ({res.score})")
    ax.set_ylabel("canaries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
