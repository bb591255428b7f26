"""Figure (i): the planner against the references (``smoothness.plan.evaluate``): PSNR against
theoretical (filled) and realized (hollow) speedup, one panel per model, 95 % intervals over seeds."""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr

STYLE = {"planner": ("C0", "o"), "planner-other": ("C9", "v"), "oracle": ("C3", "*"), "uniform": ("C7", "s"),
         "magcache": ("C1", "^"), "teacache": ("C2", "P"), "dbcache": ("C4", "X"), "fbcache": ("C5", "h")}


def figure(ds: xr.Dataset):
    """One panel per model; a line per planner across the budgets."""
    models = [str(m) for m in ds.model.values]
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        for i, p in enumerate(ds.planner.values):
            color, marker = STYLE.get(str(p), (f"C{i % 10}", "D"))
            r = ds.sel(model=m, planner=p)
            theo, real = r.theoretical_speedup.mean("seed").values, r.realized_speedup.mean("seed").values
            mean, lo, hi = (r.psnr_ci.sel(bound=b).values for b in ("mean", "low", "high"))
            err = np.vstack([mean - lo, hi - mean])
            cost = float(r.calibration_chains.mean())
            ax.errorbar(theo, mean, yerr=np.where(np.isfinite(err), err, 0), color=color, marker=marker, ms=7,
                        capsize=3, label=f"{p} ({cost:.1f} chains to calibrate)")
            ax.plot(real, mean, ls="none", marker=marker, ms=7, mfc="none", color=color, alpha=0.7)
        for b in ds.budget.values:
            ax.axvline(float(b), color="0.85", lw=0.8, zorder=0)
        ax.set_title(m)
        ax.set_xlabel("speedup (filled: theoretical, MACs; hollow: realized, wall time)")
        ax.set_ylabel("PSNR against the uncached run (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"planned cache schedules at budgets {', '.join(f'{b:g}x' for b in ds.budget.values)} "
                 f"({ds.attrs.get('chain', '')}, cfg {ds.attrs.get('cfg_scale', '')}; 95 % CI over "
                 f"{ds.sizes['seed']} seeds)", fontsize=9)
    fig.tight_layout()
    return fig
