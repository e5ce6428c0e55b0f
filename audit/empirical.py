"""Empirical privacy audit of a node's DP-SGD training in one run (Steinke, Nasr and Jagielski, NeurIPS 2023,
"Privacy Auditing with One (1) Training Run").

The auditor makes ``m`` canaries and flips a fair coin for each: heads, the canary joins the node's training
data; tails, it is left out. The node trains once, with the same code the ClientApp runs
(:func:`client.train.train_local`, Opacus DP-SGD). The auditor then scores every canary, guesses "in" for the
``k_in`` highest scores and "out" for the ``k_out`` lowest, and counts the correct guesses ``v`` out of
``r = k_in + k_out``. If the training is (ε, δ)-DP, ``v`` cannot be much larger than a Binomial(r, e^ε/(1+e^ε))
draw (Theorem 5.2 of the paper, which also bounds the δ part); the largest ε this rejects at 95% confidence is
an ε *lower bound*.

A lower bound finds bugs: a bound above the accountant's ε proves the implementation leaks more than it
claims (noise not added, clipping skipped, a wrong sample rate). A bound below the theoretical ε certifies
nothing: the canaries or the score may simply be weak. One run gives loose bounds by design.

Canaries and score (white-box, strong signal). Each canary is a short text made of vocabulary words that occur
nowhere else in the training data, with a random label. Those words' rows of the word-embedding matrix get a
gradient only from their canary, so the distance each row moved during training is a direct view of whether
the canary was sampled. Without noise an excluded canary's rows move only by weight decay; with DP noise every
row moves and the gap shrinks. This needs the embeddings to train (``train_part="full"``); the black-box
``loss`` score (loss drop of the canary's label between the initial and trained model) works for any part.

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

from client.train import DpSettings, TrainSettings, grad_sample_mode_for, planned_dp_steps, train_local
from common.data import Encoded, TextDataset, encode
from common.inference import predict
from common.model import ModelSpec, build_model, choose_device, load_tokenizer
from common.privacy import DpSgdRelease, calibrate_noise_multiplier, compute_epsilon

SCORES = ("embedding", "loss")
_WORD = re.compile(r"^[a-z]{3,}$")

ERR_GUESSES = "guesses: k_in + k_out = {r} must be between 1 and the number of canaries ({m}); got k_in={k_in}, k_out={k_out}"
ERR_CONFIDENCE = "confidence must be in (0, 1); got {value}"
ERR_SCORE_PART = ("score 'embedding' needs the word embeddings to train (train_part 'full'); got train_part "
                  "{part!r}. Use --train-part full or --score loss.")
ERR_FEW_WORDS = ("only {have} unused vocabulary words are left for canaries, {need} are needed "
                 "({m} canaries x {t} words); use fewer canaries or fewer words per canary")


# ------------------------------------------------------------------------------------------ statistics


def _binom_sf(v: int, r: int, q: float) -> float:
    """P[Binomial(r, q) >= v]."""
    from scipy.stats import binom

    return float(binom.sf(v - 1, r, q))


def p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of ``v`` or more correct guesses out of ``r`` if the mechanism is (ε, δ)-DP.

    Theorem 5.2 of Steinke et al. (2023): with ``f(u) = P[Binomial(r, p) >= u]``, ``p = e^ε / (1 + e^ε)``,
    ``P[W >= v] <= f(v) + 2 m δ max_{1 <= i <= v} (f(v - i) - f(v)) / i``.

    Parameters
    ----------
    m : int
        Number of canaries, each included independently with probability 1/2.
    r : int
        Number of guesses made (abstentions excluded), ``0 <= r <= m``.
    v : int
        Number of correct guesses, ``0 <= v <= r``.
    epsilon, delta : float
        The null hypothesis' DP parameters, ``epsilon >= 0``, ``0 <= delta <= 1``.
    """
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m; got m={m}, r={r}, v={v}")
    if epsilon < 0 or not (0.0 <= delta <= 1.0):
        raise ValueError(f"need epsilon >= 0 and 0 <= delta <= 1; got epsilon={epsilon}, delta={delta}")
    from scipy.stats import binom

    p = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = _binom_sf(v, r, p)
    if delta == 0.0 or v == 0:
        return min(1.0, tail)
    # max over i of P[v - i <= B < v] / i, the cumulative sum built from the top down
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[B = v-1], P[B = v-2], ..., P[B = 0]
    ratios = np.cumsum(pmf) / np.arange(1, v + 1)
    return min(1.0, tail + 2.0 * m * delta * float(ratios.max()))


def epsilon_lower_bound(m: int, r: int, v: int, *, delta: float = 0.0, confidence: float = 0.95) -> float:
    """Largest ε that the observed ``v`` of ``r`` correct guesses rejects at ``confidence`` (0.0 if none).

    The p-value grows with ε, so the set of rejected ε is an interval [0, ε*); bisection finds ε* to 1e-6.
    """
    if not (0.0 < confidence < 1.0):
        raise ValueError(ERR_CONFIDENCE.format(value=confidence))
    alpha = 1.0 - confidence
    if r == 0 or p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2.0
        if hi > 1e4:  # cannot happen for finite r (p_value -> 1 as ε grows); guard against a bad scipy
            return lo
    while hi - lo > 1e-6:
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def guess_and_count(scores: np.ndarray, included: np.ndarray, *, k_in: int, k_out: int,
                    seed: int = 0) -> tuple[int, int]:
    """Guess "in" for the ``k_in`` highest scores and "out" for the ``k_out`` lowest; return (r, v).

    Ties are broken by a random order drawn from ``seed`` before the scores are looked at, never by the
    membership labels (ties are common without noise, where every excluded canary scores the same).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if len(included) != m:
        raise ValueError(f"{m} scores but {len(included)} membership flags")
    if k_in < 0 or k_out < 0 or not (1 <= k_in + k_out <= m):
        raise ValueError(ERR_GUESSES.format(r=k_in + k_out, m=m, k_in=k_in, k_out=k_out))
    tiebreak = np.random.default_rng(seed).permutation(m)
    order = np.lexsort((tiebreak, scores))  # ascending by score, ties in the random order
    out_idx, in_idx = order[:k_out], order[m - k_in:] if k_in else order[:0]
    v = int(included[in_idx].sum()) + int((~included[out_idx]).sum())
    return k_in + k_out, v


# ------------------------------------------------------------------------------------------ canaries


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
    canaries: int = 200
    words_per_canary: int = 4
    guesses_in: int | None = None  # default: canaries // 5
    guesses_out: int | None = None  # default: canaries // 5
    score: str = "embedding"
    model: str = "tiny"
    train_part: str = "full"
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    clipping_norm: float = 1.0
    epsilon: float | None = 8.0  # target ε used to calibrate the noise (ignored when noise_multiplier is set)
    noise_multiplier: float | None = None  # 0.0 = a non-private control run
    delta: float = 1e-5
    accountant: str = "prv"
    max_length: int = 32
    confidence: float = 0.95
    seed: int = 0
    noise_seed: int | None = None
    device: str = "auto"


@dataclass
class AuditResult:
    settings: dict[str, Any]
    canaries: int
    included: int
    train_examples: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    theoretical_epsilon: float | None  # None: no noise, no finite ε
    noise_multiplier: float
    sample_rate: float
    steps: int
    seconds: float
    consistent: bool  # lower bound <= theoretical ε
    scores_in: list[float] = field(default_factory=list)
    scores_out: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["method"] = "one-run canary audit (Steinke, Nasr, Jagielski, NeurIPS 2023)"
        d["note"] = ("an empirical lower bound finds implementation bugs when it exceeds the theoretical epsilon; "
                     "it does not certify privacy")
        return d


def _embedding_rows(model):
    base = getattr(model, "bert", None) or model.base_model
    return base.embeddings.word_embeddings.weight


def _canary_losses(model, enc: Encoded, device) -> np.ndarray:
    res = predict(model, enc, device=device)
    # per-example loss of the canary's own label, from the predicted class probabilities
    probs = np.clip(res.scores[np.arange(len(enc)), enc.labels], 1e-12, 1.0)
    return -np.log(probs)


def run_audit(s: AuditSettings, *, base: TextDataset, progress=None) -> AuditResult:
    """Train once on ``base`` plus the included canaries, score every canary, and bound ε from below."""
    import copy

    import torch


    start = time.perf_counter()
    if s.score not in SCORES:
        raise ValueError(f"score must be one of {', '.join(SCORES)}; got {s.score!r}")
    if s.score == "embedding" and s.train_part != "full":
        raise ValueError(ERR_SCORE_PART.format(part=s.train_part))
    k_in = s.canaries // 5 if s.guesses_in is None else s.guesses_in
    k_out = s.canaries // 5 if s.guesses_out is None else s.guesses_out
    if k_in < 0 or k_out < 0 or not (1 <= k_in + k_out <= s.canaries):
        raise ValueError(ERR_GUESSES.format(r=k_in + k_out, m=s.canaries, k_in=k_in, k_out=k_out))
    device = choose_device(s.device)
    tok = load_tokenizer(s.model)
    labels = tuple(base.label_names)
    base_enc = encode(base, tok, max_length=s.max_length)
    used = {i for ids in base_enc.input_ids for i in ids}
    can = make_canaries(tok, s.canaries, num_labels=len(labels), words_per_canary=s.words_per_canary,
                        avoid=used, seed=s.seed)
    can_ds = TextDataset(texts=can.texts, labels=can.labels, label_names=list(labels))
    can_enc = encode(can_ds, tok, max_length=s.max_length)
    inc = np.flatnonzero(can.included)
    train = Encoded(input_ids=base_enc.input_ids + [can_enc.input_ids[i] for i in inc],
                    labels=np.concatenate([base_enc.labels, can_enc.labels[inc]]))
    n = len(train)
    sample_rate, steps = planned_dp_steps(n, batch_size=s.batch_size, epochs=s.epochs)
    if s.noise_multiplier is not None:
        sigma = float(s.noise_multiplier)
        if sigma < 0:
            raise ValueError(f"noise_multiplier must be >= 0; got {sigma}")
    else:
        if s.epsilon is None or s.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0 when no noise multiplier is given; got {s.epsilon}")
        sigma = calibrate_noise_multiplier(target_epsilon=s.epsilon, delta=s.delta, sample_rate=sample_rate,
                                           steps=steps, accountant=s.accountant)
    theoretical = (compute_epsilon([DpSgdRelease(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)],
                                   delta=s.delta, accountant=s.accountant) if sigma > 0 else None)

    model = build_model(ModelSpec(source=s.model, labels=labels, train_part=s.train_part, top_k_layers=0))
    model.to(device)
    before = _embedding_rows(model).detach().to("cpu", copy=True) if s.score == "embedding" else None
    initial = copy.deepcopy(model) if s.score == "loss" else None
    if progress is not None:
        progress(f"training on {n} examples ({len(inc)} of {s.canaries} canaries in), σ={sigma:.4g}, "
                 f"q={sample_rate:.4g}, {steps} steps")
    settings = TrainSettings(epochs=s.epochs, batch_size=s.batch_size, max_physical_batch_size=s.batch_size,
                             learning_rate=s.learning_rate, weight_decay=s.weight_decay, warmup_ratio=0.0,
                             seed=s.seed)
    dp = DpSettings(noise_multiplier=sigma, clipping_norm=s.clipping_norm,
                    grad_sample_mode=grad_sample_mode_for(s.train_part), noise_seed=s.noise_seed)
    train_local(model, train, settings=settings, device=device, dp=dp)

    if s.score == "embedding":
        after = _embedding_rows(model).detach().to("cpu")
        moved = torch.linalg.vector_norm(after - before, dim=1).numpy().astype(np.float64)
        scores = np.array([moved[ids].mean() for ids in can.token_ids])
    else:
        scores = _canary_losses(initial, can_enc, device) - _canary_losses(model, can_enc, device)
    r, v = guess_and_count(scores, can.included, k_in=k_in, k_out=k_out, seed=s.seed + 1)
    lb = epsilon_lower_bound(s.canaries, r, v, delta=s.delta, confidence=s.confidence)
    return AuditResult(
        settings=asdict(s), canaries=s.canaries, included=int(len(inc)), train_examples=n, guesses=r, correct=v,
        epsilon_lower_bound=lb, theoretical_epsilon=theoretical, noise_multiplier=sigma,
        sample_rate=sample_rate, steps=steps, seconds=time.perf_counter() - start,
        consistent=theoretical is None or lb <= theoretical,
        scores_in=[float(x) for x in scores[can.included]], scores_out=[float(x) for x in scores[~can.included]])


def plot_scores(res: AuditResult, out: Path) -> Path:
    """Histogram of the canary scores, included vs left out, with both ε in the title (headless, no pyplot)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2, 4.0))
    ax = fig.add_subplot()
    both = np.array(res.scores_in + res.scores_out)
    bins = np.linspace(both.min(), both.max() + 1e-12, 40) if len(both) else 10
    ax.hist(res.scores_out, bins=bins, alpha=0.6, label=f"left out ({len(res.scores_out)})")
    ax.hist(res.scores_in, bins=bins, alpha=0.6, label=f"included ({len(res.scores_in)})")
    theo = "inf (no noise)" if res.theoretical_epsilon is None else f"{res.theoretical_epsilon:.2f}"
    ax.set_title(f"canary scores: ε lower bound {res.epsilon_lower_bound:.2f} (95%), theoretical ε {theo}",
                 fontsize=9)
    ax.set_xlabel(f"score ({res.settings['score']})")
    ax.set_ylabel("canaries")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    return out
