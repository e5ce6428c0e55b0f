"""A ``classifier`` round with and without the frozen-encoder feature cache, side by side in one run.

One node's round as the ClientApp runs it: DP-SGD training of the classifier (Opacus, Poisson sampling,
the train part's recipe) on the node's training split, then prediction on its validation split. Three
timings on the same data and seeds:

* ``uncached``: every epoch runs the frozen MiniLM encoder over the batch (what a ``classifier`` round cost
  before the cache), and evaluation runs it again over the validation split;
* ``cached_first``: the first round with the cache (encode train and validation once, then train and
  evaluate the classifier on the features);
* ``cached_next``: any later round (features already in memory).

It also reports the largest difference between the cached and uncached updates (same noise seed).

    python benchmarks/frozen_cache.py --data ../shared/data/sst2/train.tsv --rows 1730
    python benchmarks/frozen_cache.py --model tiny --rows 400          # quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client import features as F  # noqa: E402
from client.train import DpSettings, TrainSettings, train_local  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import Schema, encode, load_dataset, train_val_split  # noqa: E402
from common.inference import predict  # noqa: E402
from common.model import ModelSpec, build_model, load_tokenizer, load_trainable, trainable_state  # noqa: E402


def main() -> None:
    import numpy as np
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "sst2" / "train.tsv"))
    ap.add_argument("--rows", type=int, default=1730, help="node dataset size (SST-2 over 4 nodes: 510-2623, "
                    "mean 1730 before the 20%% validation split)")
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--noise", type=float, default=1.0, help="noise multiplier (fixed; no accounting here)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    cfg = RunConfig(model=args.model, train_part="classifier").resolved()  # the DP recipe of the classifier
    ds = load_dataset(args.data, schema=Schema("sentence", "label", ""), labels=["0", "1"])
    ds = ds.subset(np.arange(min(args.rows, len(ds))))
    tr, va = train_val_split(len(ds), val_fraction=cfg.val_fraction, seed=0)
    tok = load_tokenizer(args.model)
    train_enc = encode(ds.subset(tr), tok, max_length=args.max_length)
    val_enc = encode(ds.subset(va), tok, max_length=args.max_length)
    model = build_model(ModelSpec(args.model, ("0", "1"), train_part="classifier"))
    start = trainable_state(model)
    settings = TrainSettings(epochs=cfg.local_epochs, batch_size=cfg.batch_size,
                             max_physical_batch_size=cfg.max_physical_batch_size, learning_rate=cfg.learning_rate,
                             weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, seed=1)
    dp = DpSettings(noise_multiplier=args.noise, clipping_norm=cfg.clipping_norm, grad_sample_mode="hooks",
                    noise_seed=7)

    def round_(cached: bool) -> tuple[float, dict]:
        load_trainable(model, start)
        t0 = time.perf_counter()
        feats = F.cached_features(model, train_enc, source=args.model, device=cpu) if cached else None
        train_local(model, train_enc, settings=settings, device=cpu, dp=dp, features=feats)
        after = trainable_state(model)
        if cached:
            F.predict_node(model, val_enc, source=args.model, device=cpu)
        else:
            predict(model, val_enc, device=cpu)
        return time.perf_counter() - t0, after

    F.clear_cache()
    t_unc, w_unc = round_(cached=False)
    t_first, w_first = round_(cached=True)
    t_next, w_next = round_(cached=True)
    t_next2, _ = round_(cached=True)
    diff = max(float(np.abs(w_unc[k] - w_first[k]).max()) for k in w_unc)
    nxt = min(t_next, t_next2)
    print(json.dumps({
        "benchmark": "frozen_cache", "model": args.model, "train_rows": len(train_enc), "val_rows": len(val_enc),
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "recipe": {"batch_size": cfg.batch_size, "local_epochs": cfg.local_epochs, "learning_rate": cfg.learning_rate,
                   "clipping_norm": cfg.clipping_norm},
        "seconds": {"uncached": round(t_unc, 3), "cached_first": round(t_first, 3), "cached_next": round(nxt, 3)},
        "speedup_next_vs_uncached": round(t_unc / nxt, 1),
        "speedup_first_vs_uncached": round(t_unc / t_first, 2),
        "target_next_round_10x_cheaper": t_unc / nxt >= 10,
        "max_abs_update_difference_cached_vs_uncached": diff,
        "same_update_again": all(np.array_equal(w_first[k], w_next[k]) for k in w_first),
    }, indent=2))


if __name__ == "__main__":
    main()
