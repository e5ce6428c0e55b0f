"""Optional second layer: client-level central DP on the server (DP-FedAvg, McMahan et al. 2018).

Each accepted node update ``u_i = new_i - global`` is clipped to L2 norm C with Flower's
``compute_clip_model_update``; the clipped updates are averaged with equal weights and Gaussian noise
N(0, (σ C / m)^2) is added to every coordinate (m = nodes aggregated). Each release is accounted with
Flower's RDP accountant (``flwr.serverapp.RdpAccountant``, no subsampling credit: the conservative setting
Flower requires) and written to the server's own signed ledger ``RUN_DIR/ledgers/server.jsonl``. The
accountant's state goes into the checkpoint; a resumed run rebuilds it from the server's signed ledger, which
also holds a release made just before a crash that the checkpoint missed.

The noise comes from a NumPy ``Generator`` seeded from OS entropy (or from ``noise-seed`` in simulations).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np

from common.config import RunConfig


class CentralDp:
    def __init__(self, cfg: RunConfig, *, population_size: int, state: dict[str, Any] | None = None) -> None:
        from flwr.serverapp import NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

        self.cfg = cfg
        self.delta = cfg.delta if cfg.delta > 0 else 1e-5
        self.population_size = population_size
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=self.delta,
            population_size=population_size,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))
        if state:
            self.accountant.load_state_dict(state)
        seed = None if cfg.noise_seed < 0 else cfg.noise_seed + 7919
        self.rng = np.random.default_rng(seed)

    def compose(self, *, noise_multiplier: float, sample_size: int) -> None:
        """Account one Gaussian release of ``sample_size`` clipped updates (no subsampling credit)."""
        from flwr.serverapp import GaussianPrivacyEvent

        self.accountant.compose(GaussianPrivacyEvent(noise_multiplier=float(noise_multiplier),
                                                     sample_size=int(sample_size),
                                                     population_size=self.population_size))

    def state_dict(self) -> dict[str, Any]:
        return self.accountant.state_dict()

    def epsilon(self) -> float:
        return float(self.accountant.get_privacy_spent().epsilon)

    def aggregate(self, updates: list[dict[str, np.ndarray]], global_arrays: dict[str, np.ndarray],
                  *, server_round: int) -> dict[str, np.ndarray]:
        """Clip, average with equal weights, add noise; compose one Gaussian release."""
        from flwr.supercore.differential_privacy import compute_clip_model_update

        keys = list(global_arrays)
        ref = [global_arrays[k].astype(np.float64) for k in keys]
        m = len(updates)
        acc = [np.zeros_like(r) for r in ref]
        for upd in updates:
            arrs = [upd[k].astype(np.float64) for k in keys]
            # Flower's clip divides by the update's norm: an unchanged model (norm 0) needs no clipping
            if any(np.any(x != r) for x, r in zip(arrs, ref, strict=True)):
                compute_clip_model_update(param1=arrs, param2=ref, clipping_norm=self.cfg.central_clipping_norm)
            for a, x, r in zip(acc, arrs, ref, strict=True):
                a += (x - r) / m
        std = self.cfg.central_noise_multiplier * self.cfg.central_clipping_norm / m
        out = {k: (r + a + self.rng.normal(0.0, std, size=r.shape)).astype(np.float32)
               for k, r, a in zip(keys, ref, acc, strict=True)}
        self.compose(noise_multiplier=self.cfg.central_noise_multiplier, sample_size=m)
        self.last_release = {
            "schema": 1,
            "kind": "central-dp",
            "round": server_round,
            "node": "server",
            "accountant": "flwr-rdp",
            "delta": self.delta,
            "noise_multiplier": self.cfg.central_noise_multiplier,
            "clipping_norm": self.cfg.central_clipping_norm,
            "sample_size": m,
            "population_size": self.population_size,
            "sampling": "no-amplification",
            "noise_std": std,
            "epsilon": self.epsilon(),
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        return out
