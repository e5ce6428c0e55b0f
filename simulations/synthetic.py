"""A synthetic demo dataset that needs nothing but this package.

Short review-like sentences for a 2-class task (``negative``/``positive``) with a group attribute
(``north``/``south``, think of two dialects or two sites). Two knobs make fairness gaps visible:

* ``label_skew``: P(positive | north) = 0.5 + skew/2 and P(positive | south) = 0.5 - skew/2, so a model that
  leans on group words gets different selection rates per group;
* ``south_noise``: the share of south examples whose sentiment words are ambiguous (label decided by the
  skewed prior only), so the model is less accurate on the south group.

The task is learnable: sentiment words decide the label for every non-ambiguous example.
"""

from __future__ import annotations

import numpy as np

from common.data import TextDataset

POSITIVE = ["great", "excellent", "wonderful", "helpful", "friendly", "superb", "pleasant", "reliable",
            "outstanding", "caring", "quick", "clear"]
NEGATIVE = ["terrible", "awful", "rude", "slow", "confusing", "poor", "unhelpful", "dreadful", "careless",
            "painful", "broken", "useless"]
NEUTRAL = ["okay", "usual", "average", "ordinary", "typical", "fine"]
SUBJECTS = ["the staff", "the service", "the visit", "the doctor", "the nurse", "the app", "the clinic",
            "the waiting room", "the billing", "the follow-up", "the advice", "the team"]
GROUP_WORDS = {
    "north": ["honestly", "truly", "really", "quite"],
    "south": ["proper", "right", "dead", "well"],
}
TEMPLATES = [
    "{subject} was {m} {adj}",
    "i found {subject} {m} {adj}",
    "{subject} felt {m} {adj} today",
    "overall {subject} was {m} {adj}",
    "{m} {adj}, that is how {subject} was",
]
LABELS = ["negative", "positive"]
GROUPS = ["north", "south"]


def make_synthetic(n: int, *, seed: int = 0, label_skew: float = 0.4, south_noise: float = 0.25,
                   south_share: float = 0.4) -> TextDataset:
    """Generate ``n`` labelled sentences with groups.

    Parameters
    ----------
    n : int
        Number of examples (>= 1).
    seed : int
        Seed of the generator; the same seed gives the same data.
    label_skew : float
        In [0, 1): difference of positive rates between north and south.
    south_noise : float
        In [0, 1]: share of south examples with only neutral words (label from the prior alone).
    south_share : float
        In (0, 1): share of examples in the south group.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= label_skew < 1.0:
        raise ValueError(f"label_skew must be in [0, 1), got {label_skew}")
    if not 0.0 <= south_noise <= 1.0:
        raise ValueError(f"south_noise must be in [0, 1], got {south_noise}")
    if not 0.0 < south_share < 1.0:
        raise ValueError(f"south_share must be in (0, 1), got {south_share}")
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    labels: list[int] = []
    groups: list[str] = []
    for _ in range(n):
        group = "south" if rng.random() < south_share else "north"
        p_pos = 0.5 + label_skew / 2 if group == "north" else 0.5 - label_skew / 2
        y = int(rng.random() < p_pos)
        ambiguous = group == "south" and rng.random() < south_noise
        if ambiguous:
            adj = str(rng.choice(NEUTRAL))
        else:
            adj = str(rng.choice(POSITIVE if y else NEGATIVE))
        template = str(rng.choice(TEMPLATES))
        text = template.format(subject=str(rng.choice(SUBJECTS)), m=str(rng.choice(GROUP_WORDS[group])), adj=adj)
        texts.append(text)
        labels.append(y)
        groups.append(group)
    return TextDataset(texts=texts, labels=np.asarray(labels, dtype=np.int64), label_names=list(LABELS),
                       groups=groups, source=f"synthetic(n={n}, seed={seed}, skew={label_skew})")
