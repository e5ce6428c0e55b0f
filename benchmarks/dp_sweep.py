"""Sweep the DP recipe of the frozen-encoder probe on SST-2, cheaply: encode once, then train heads only.

Everything runs through the product's own code paths: ``simulations.runner.prepare_nodes`` splits
``train.tsv`` over 4 nodes (Dirichlet alpha=1, seed 0) exactly as ``fedpriv simulate`` does,
``client.node.load_node_data`` gives each node its train/validation split and tokens,
``client.features.encode_features`` computes the frozen MiniLM's (mean-pooled) features once, and each
setting then runs a federation on the cached features: every round each node calibrates its noise like
``client.budget`` (PRV, δ=1e-5, σ for all planned rounds), trains with ``client.train.train_local`` (Opacus
DP-SGD on the classifier, Poisson sampling), and the server averages (FedAvg, weighted by examples) and
evaluates on ``dev.tsv``. Output: JSON lines, one per (setting, ε, seed), and a summary.

    python benchmarks/dp_sweep.py --stage grid --features-file runs/sst2-feats.pt  # batch x epochs x lr, ε 1 and 8
    python benchmarks/dp_sweep.py --stage final --batch 128 --epochs 4 --lr 0.05 --clip 1   # 3 seeds, ε 1/3/8
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.features import encode_features, predict_features  # noqa: E402
from client.node import load_node_config, load_node_data  # noqa: E402
from client.train import DpSettings, TrainSettings, planned_dp_steps, train_local  # noqa: E402
from common.config import RunConfig  # noqa: E402
from common.data import Schema, encode, load_dataset  # noqa: E402
from common.model import (  # noqa: E402
    ModelSpec,
    build_model,
    load_tokenizer,
    load_trainable,
    resolve_pooling,
    trainable_state,
)
from common.privacy import calibrate_noise_multiplier  # noqa: E402
from common.seeds import derived_seed  # noqa: E402
from simulations.runner import SimOptions, prepare_nodes  # noqa: E402

DELTA = 1e-5


def prepare(args, tmp: Path):
    import torch

    cfg = RunConfig(model=args.model, train_part="classifier", pooling=args.pooling, text_col="sentence",
                    label_col="label", max_length=args.max_length, seed=0, out=str(tmp)).resolved()
    if args.features_file and Path(args.features_file).is_file():  # a previous stage's encoding (public data)
        nodes, dev_enc, dev_feats, info = torch.load(args.features_file, weights_only=False)
        # the model is rebuilt (same seeded head), never unpickled: its hooks do not pickle
        model = build_model(ModelSpec(cfg.model, tuple(info["labels"]), train_part="classifier",
                                      pooling=info["pooling"]))
        return model, nodes, dev_enc, dev_feats, info
    cfg, nodes_dir = prepare_nodes(cfg, SimOptions(nodes=4, data=str(Path(args.data_dir) / "train.tsv"),
                                                   partition="dirichlet", alpha=1.0), tmp)
    pooling = resolve_pooling(cfg.pooling, cfg.model)
    model = build_model(ModelSpec(cfg.model, tuple(cfg.label_names), train_part="classifier", pooling=pooling))
    t0 = time.perf_counter()
    nodes = []
    for i in range(4):
        node = load_node_config({"partition-id": i}, str(nodes_dir))
        data = load_node_data(node, cfg, model_source=cfg.model)
        nodes.append((f"node-{i}", data.train, encode_features(model, data.train, device=torch.device("cpu"))))
    dev = load_dataset(Path(args.data_dir) / "dev.tsv", schema=Schema("sentence", "label", ""),
                       labels=cfg.label_names)
    dev_enc = encode(dev, load_tokenizer(cfg.model), max_length=cfg.max_length)
    dev_feats = encode_features(model, dev_enc, device=torch.device("cpu"))
    encode_s = time.perf_counter() - t0
    norms = torch.cat([f for _, _, f in nodes]).norm(dim=1)
    info = {"pooling": pooling, "labels": list(cfg.label_names), "node_sizes": [len(e) for _, e, _ in nodes], "encode_seconds": round(encode_s, 1),
            "feature_norm_median": round(float(norms.median()), 3), "dev_rows": len(dev_enc)}
    if args.features_file:  # written whole or not at all: a half-written file would fail the next stage
        part = Path(args.features_file + ".part")
        torch.save((nodes, dev_enc, dev_feats, info), part)
        part.replace(args.features_file)
    return model, nodes, dev_enc, dev_feats, info


_SIGMA: dict = {}


def federate(model, nodes, dev_enc, dev_feats, *, eps, batch, epochs, lr, clip, rounds, seed) -> dict:
    import numpy as np
    import torch

    cpu = torch.device("cpu")
    init = trainable_state(model)
    state = {k: v.copy() for k, v in init.items()}
    accs = []
    for rnd in range(1, rounds + 1):
        ups, ws = [], []
        for name, enc, feats in nodes:
            load_trainable(model, state)
            n = len(enc)
            dp = None
            if eps is not None:
                q, steps = planned_dp_steps(n, batch_size=batch, epochs=epochs)
                key = (eps, q, steps * rounds)
                if key not in _SIGMA:
                    _SIGMA[key] = calibrate_noise_multiplier(target_epsilon=eps, delta=DELTA, sample_rate=q,
                                                             steps=steps * rounds, accountant="prv")
                dp = DpSettings(noise_multiplier=_SIGMA[key], clipping_norm=clip, grad_sample_mode="hooks",
                                noise_seed=derived_seed(seed, name, rnd, "noise"))
            st = TrainSettings(epochs=epochs, batch_size=batch, max_physical_batch_size=batch, learning_rate=lr,
                               weight_decay=0.01, warmup_ratio=0.1, seed=derived_seed(seed, name, rnd))
            train_local(model, enc, settings=st, device=cpu, dp=dp, features=feats)
            ups.append(trainable_state(model))
            ws.append(n)
        total = sum(ws)
        state = {k: sum(u[k] * (w / total) for u, w in zip(ups, ws, strict=True)).astype(np.float32) for k in state}
        load_trainable(model, state)
        res = predict_features(model, dev_feats, dev_enc.labels, device=cpu)
        accs.append(float((res.y_pred == res.y_true).mean()))
    load_trainable(model, init)
    return {"dev_accuracy": accs[-1], "by_round": [round(a, 4) for a in accs]}


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "sst2"))
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--pooling", default="auto")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--stage", choices=("grid", "clip", "final"), default="grid")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features-file", default="", help="keep the encoded SST-2 features here between stages")
    ap.add_argument("--epsilons", default="8,1", help="the grid and clip stages' ε values (final: inf,8,3,1)")
    ap.add_argument("--grid-seeds", type=int, default=1,
                    help="noise seeds per grid/clip setting (the median is compared; one seed is noisy: ±0.01)")
    ap.add_argument("--batches", default="128,256,512", help="the grid stage's expected batch sizes")
    ap.add_argument("--epochs-list", default="4,8", help="the grid stage's local epochs")
    ap.add_argument("--lrs", default="0.05,0.1,0.2", help="the grid stage's learning rates")
    ap.add_argument("--clips", default="0.1,0.25,0.5,1,2", help="the clip stage's clipping norms")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, nodes, dev_enc, dev_feats, info = prepare(args, Path(tmp))
    print(json.dumps({"prepared": info}), flush=True)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    if args.stage == "grid":
        grid = [(e, b, ep, lr, args.clip, args.grid_seeds) for e in epsilons for b, ep, lr in
                itertools.product(_ints(args.batches), _ints(args.epochs_list), _floats(args.lrs))]
    elif args.stage == "clip":
        grid = [(e, args.batch, args.epochs, args.lr, c, args.grid_seeds) for e in epsilons
                for c in _floats(args.clips)]
    else:
        grid = [(e, args.batch, args.epochs, args.lr, args.clip, args.seeds) for e in (None, 8.0, 3.0, 1.0)]
    summary = []
    for eps, batch, epochs, lr, clip, seeds in grid:
        t0 = time.perf_counter()
        runs = [federate(model, nodes, dev_enc, dev_feats, eps=eps, batch=batch, epochs=epochs, lr=lr, clip=clip,
                         rounds=args.rounds, seed=s) for s in range(seeds)]
        row = {"epsilon": eps if eps is not None else "inf", "batch": batch, "epochs": epochs, "lr": lr,
               "clip": clip, "rounds": args.rounds, "seeds": seeds,
               "dev_accuracy_median": statistics.median(r["dev_accuracy"] for r in runs),
               "dev_accuracy": [round(r["dev_accuracy"], 4) for r in runs], "by_round": runs[0]["by_round"],
               "seconds": round(time.perf_counter() - t0, 1)}
        summary.append(row)
        print(json.dumps(row), flush=True)
    for eps in sorted({r["epsilon"] for r in summary}, key=str):
        best = max((r for r in summary if r["epsilon"] == eps), key=lambda r: r["dev_accuracy_median"])
        print(json.dumps({"best_at_epsilon": eps, **best}), flush=True)


if __name__ == "__main__":
    main()
