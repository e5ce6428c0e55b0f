"""DP recipes: per train part, the local-training settings that learn under DP-SGD (and without it).

A recipe fills the run-config keys a user leaves at 0 (``batch-size``, ``local-epochs``, ``learning-rate``,
``clipping-norm``) and the ``auto`` train part; explicit values always win (:meth:`RunConfig.resolved`).
The DP recipe of ``classifier`` (the default under DP: a linear probe on the frozen, mean-pooled encoder)
was chosen by a measured sweep on SST-2 over 4 nodes (docs/measured-dp-utility.md); the DP recipes of the
encoder-training parts follow the published large-batch recipes (Li et al. 2022; Yu et al. 2022) scaled to
federated nodes of about 1,000-3,000 examples and were not swept here. ``batch-size`` is the expected
(Poisson) batch size under DP; ``max-physical-batch-size`` splits it into memory-sized pieces.

This module is data plus one pure lookup; nothing privacy-deciding lives here: the node accounts for the
resolved values exactly as if the user had typed them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The train part ``auto`` becomes: under DP the part with the best measured accuracy, without DP a part that
# fine-tunes the encoder (measured: full fine-tuning reaches 0.86 SST-2 dev accuracy in 3 rounds).
AUTO_PART_DP = "classifier"
AUTO_PART_NO_DP = "full"


@dataclass(frozen=True)
class Recipe:
    batch_size: int  # expected (Poisson) batch size under DP; shuffled mini-batch size without DP
    local_epochs: int  # passes over the node's training split per round
    learning_rate: float  # AdamW learning rate
    clipping_norm: float  # per-example gradient L2 bound C (DP only; recorded in the ledger)


# (train part, dp) -> recipe. "head" with top-k-layers > 0 uses the key ("head+layers", dp).
RECIPES: dict[tuple[str, bool], Recipe] = {
    # measured (docs/measured-dp-utility.md): the linear probe needs large steps and many epochs under noise
    ("classifier", True): Recipe(batch_size=128, local_epochs=8, learning_rate=5e-2, clipping_norm=1.0),
    ("classifier", False): Recipe(batch_size=64, local_epochs=4, learning_rate=5e-2, clipping_norm=1.0),
    ("head", True): Recipe(batch_size=128, local_epochs=4, learning_rate=2e-2, clipping_norm=1.0),
    ("head", False): Recipe(batch_size=64, local_epochs=2, learning_rate=2e-2, clipping_norm=1.0),
    ("head+layers", True): Recipe(batch_size=256, local_epochs=2, learning_rate=5e-4, clipping_norm=1.0),
    ("head+layers", False): Recipe(batch_size=32, local_epochs=1, learning_rate=5e-4, clipping_norm=1.0),
    # literature-derived (not swept here): large logical batches, few epochs, small clipping for full. Measured
    # once on SST-2 over 4 nodes at ε=8: lora predicts one class (0.509) after 3 rounds, 24 minutes on 2 cores
    # (docs/measured-dp-utility.md): with ~1,400 examples a node these recipes take too few noisy steps
    ("lora", True): Recipe(batch_size=256, local_epochs=2, learning_rate=2e-3, clipping_norm=1.0),
    ("lora", False): Recipe(batch_size=32, local_epochs=1, learning_rate=1e-3, clipping_norm=1.0),
    ("full", True): Recipe(batch_size=256, local_epochs=2, learning_rate=5e-4, clipping_norm=0.1),
    # measured: 0.860 SST-2 dev accuracy after 3 rounds (issue 14)
    ("full", False): Recipe(batch_size=32, local_epochs=1, learning_rate=1.5e-4, clipping_norm=1.0),
}


def auto_part(*, dp: bool) -> str:
    """The concrete train part behind ``auto``."""
    return AUTO_PART_DP if dp else AUTO_PART_NO_DP


def recipe_for(train_part: str, *, dp: bool, top_k_layers: int = 0) -> Recipe:
    """The recipe of a concrete train part (``auto`` must be resolved first with :func:`auto_part`)."""
    key = "head+layers" if train_part == "head" and top_k_layers > 0 else train_part
    try:
        return RECIPES[(key, dp)]
    except KeyError:
        raise ValueError(f"no recipe for train part {train_part!r}; resolve 'auto' first") from None
