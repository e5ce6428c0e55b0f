"""The one-run canary audit: its statistics are valid bounds, and it tells broken DP from working DP.

The statistics are checked against closed forms and against randomized response, a mechanism whose ε is known
exactly; the end-to-end audits train the tiny BERT with the ClientApp's DP-SGD code.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from audit.empirical import (
    AuditSettings,
    epsilon_lower_bound,
    guess_and_count,
    make_canaries,
    p_value,
    run_audit,
)


def test_all_guesses_correct_has_the_closed_form_bound() -> None:
    # delta = 0: P[Binom(r, p) >= r] = p^r = 0.05  =>  p = 0.05^(1/r), eps = log(p / (1 - p))
    for r in (10, 40, 80):
        p = 0.05 ** (1 / r)
        assert epsilon_lower_bound(200, r, r, delta=0.0) == pytest.approx(math.log(p / (1 - p)), abs=1e-5)


def test_p_value_is_the_binomial_tail_without_delta_and_larger_with_it() -> None:
    from scipy.stats import binom

    q = math.exp(1.0) / (1 + math.exp(1.0))
    assert p_value(100, 40, 30, 1.0) == pytest.approx(binom.sf(29, 40, q), rel=1e-12)
    assert p_value(100, 40, 30, 1.0, delta=1e-3) > p_value(100, 40, 30, 1.0)
    # monotone in epsilon, so the rejected set is an interval
    ps = [p_value(100, 40, 30, e) for e in np.linspace(0, 5, 30)]
    assert all(a <= b + 1e-15 for a, b in zip(ps, ps[1:], strict=False))


def test_delta_makes_the_bound_more_conservative() -> None:
    assert epsilon_lower_bound(1000, 80, 80, delta=1e-3) < epsilon_lower_bound(1000, 80, 80, delta=0.0)


def test_chance_level_guessing_gives_no_bound() -> None:
    assert epsilon_lower_bound(200, 80, 40, delta=1e-5) == 0.0
    assert epsilon_lower_bound(200, 80, 10, delta=1e-5) == 0.0
    assert epsilon_lower_bound(200, 0, 0) == 0.0


def test_bound_is_valid_at_95_percent_on_randomized_response() -> None:
    # Randomized response with eps0: each guess is right with probability e^eps0 / (1 + e^eps0) -- the worst
    # case the theorem allows. The bound may exceed eps0 in at most ~5% of runs.
    rng = np.random.default_rng(7)
    for eps0 in (0.5, 2.0):
        r, trials = 60, 2000
        v = rng.binomial(r, math.exp(eps0) / (1 + math.exp(eps0)), size=trials)
        bounds = {int(x): epsilon_lower_bound(200, r, int(x)) for x in np.unique(v)}
        over = np.mean([bounds[int(x)] > eps0 for x in v])
        assert over <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / trials), (eps0, over)
        assert over > 0.0  # not vacuous: the bound does reach eps0 sometimes


def test_guessing_uses_top_and_bottom_scores() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.55])
    included = np.array([True, False, True, True, False, False])
    assert guess_and_count(scores, included, k_in=2, k_out=2) == (4, 3)  # 0.2 guessed out but was in
    assert guess_and_count(scores, included, k_in=2, k_out=0) == (2, 2)
    with pytest.raises(ValueError, match="between 1 and the number of canaries"):
        guess_and_count(scores, included, k_in=4, k_out=3)


def test_ties_are_not_broken_by_membership() -> None:
    # All scores equal: guesses are coin flips, whatever the membership pattern.
    included = np.arange(400) % 2 == 0
    r, v = guess_and_count(np.zeros(400), included, k_in=100, k_out=100)
    assert r == 200 and 70 < v < 130


def test_canaries_use_unused_words_once_each(tokenizer) -> None:
    avoid = set(range(0, 5000))
    can = make_canaries(tokenizer, 50, num_labels=3, words_per_canary=4, avoid=avoid, seed=1)
    ids = [i for t in can.token_ids for i in t]
    assert len(ids) == len(set(ids)) == 200 and not avoid & set(ids)
    for text, t in zip(can.texts, can.token_ids, strict=True):
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == t
    assert set(can.labels.tolist()) <= {0, 1, 2}
    assert 10 < can.included.sum() < 40  # fair coins
    again = make_canaries(tokenizer, 50, num_labels=3, words_per_canary=4, avoid=avoid, seed=1)
    assert again.texts == can.texts and (again.included == can.included).all()


def test_too_many_canaries_is_a_clear_error(tokenizer) -> None:
    with pytest.raises(ValueError, match="unused vocabulary words are left"):
        make_canaries(tokenizer, 100_000, num_labels=2, words_per_canary=4, avoid=set(), seed=0)


@pytest.fixture(scope="module")
def base():
    from simulations.synthetic import make_synthetic

    return make_synthetic(200, seed=1)


def _audit(base, **kw):
    s = AuditSettings(canaries=150, epochs=4, noise_seed=0, accountant="rdp", **kw)
    return run_audit(s, base=base)


def test_training_without_noise_is_caught_and_private_training_is_not(base) -> None:
    leaky = _audit(base, noise_multiplier=0.0)
    private = _audit(base, epsilon=2.0)
    assert leaky.theoretical_epsilon is None and leaky.epsilon_lower_bound > 1.0, leaky.correct
    assert private.noise_multiplier > 0.5
    assert private.epsilon_lower_bound < 0.5
    assert private.theoretical_epsilon == pytest.approx(2.0, rel=0.02)
    assert private.consistent and private.epsilon_lower_bound <= private.theoretical_epsilon
    assert leaky.guesses == private.guesses == 60
    assert len(leaky.scores_in) + len(leaky.scores_out) == 150


def test_embedding_score_needs_full_fine_tuning(base) -> None:
    with pytest.raises(ValueError, match="train_part 'full'"):
        run_audit(AuditSettings(train_part="head"), base=base)


def test_cli_writes_json_and_plot(tmp_path, capsys) -> None:
    from fedpriv.cli import main

    out, png = tmp_path / "audit.json", tmp_path / "scores.png"
    rc = main(["audit", "empirical", "--examples", "120", "--canaries", "60", "--epochs", "2",
               "--noise-multiplier", "1.0", "--noise-seed", "0", "--score", "loss", "--train-part", "head",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["canaries"] == 60 and rep["guesses"] == 24 and rep["noise_multiplier"] == 1.0
    assert rep["epsilon_lower_bound"] <= rep["theoretical_epsilon"]
    assert "does not certify privacy" in rep["note"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "theoretical ε" in capsys.readouterr().out


def test_cli_rejects_bad_guess_counts(capsys) -> None:
    from fedpriv.cli import main

    assert main(["audit", "empirical", "--canaries", "10", "--guesses-in", "8", "--guesses-out", "8"]) == 2
    assert "between 1 and the number of canaries" in capsys.readouterr().err
