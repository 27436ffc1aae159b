"""The evaluation report's PNG plots: accuracy with intervals, reliability, margins, length bias,
and the re-check's conflict matrix as a heat map (matplotlib, imported inside: no display needed).
"""

from __future__ import annotations

from pathlib import Path

from cai.recheck import RECHECK_PLOT
from cai.records import write_atomic

PLOTS = ("accuracy.png", "reliability.png", "margins.png", "length_bias.png")


def write_plots(metrics: dict, out: Path) -> list[str]:
    """The four PNGs of PLOTS (and the re-check's heat map when the pairs carry one) into ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    written = []
    for name, draw in zip(PLOTS, (_accuracy_plot, _reliability_plot, _margins_plot, _length_bias_plot)):
        fig = draw(plt, metrics)
        fig.tight_layout()
        write_atomic(out / name, lambda f: fig.savefig(f, dpi=110, format="png"))
        plt.close(fig)
        written.append(name)
    if metrics.get("recheck"):
        written.append(write_recheck_plot(metrics["recheck"], out))
    return written


def _accuracy_plot(plt, metrics: dict):
    """Accuracy with intervals, models and baselines on one axis."""
    models = metrics["models"]
    rows = [(n, m["accuracy"]) for n, m in models.items()] + [
        (f"[baseline] {n}", b["accuracy"]) for n, b in metrics["baselines"].items()
    ]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    for y, (n, a) in enumerate(reversed(rows)):
        if a["value"] is None:
            continue
        lo, hi = a["ci"]
        ax.errorbar(
            a["value"],
            y,
            xerr=[[a["value"] - lo], [hi - a["value"]]],
            fmt="o",
            color="grey" if n.startswith("[baseline]") else "C0",
            capsize=3,
        )
    ax.axvline(0.5, color="k", lw=0.8, ls=":")
    ax.set_yticks(range(len(rows)), [n for n, _ in reversed(rows)])
    ax.set_xlabel("accuracy on test pairs (ties ½), 95% bootstrap CI")
    ax.set_xlim(0, 1)
    return fig


def _reliability_plot(plt, metrics: dict):
    """Reliability of σ(Δ): confidence against the share of right picks, per model."""
    models = metrics["models"]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.plot([0.5, 1], [0.5, 1], "k:", lw=0.8, label="perfect calibration")
    for i, (n, m) in enumerate(models.items()):
        bins = m.get("calibration", {}).get("bins", [])
        if bins:
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                "o-",
                color=f"C{i}",
                label=f"{n} (ECE {m['calibration']['ece']:.3f})",
            )
    ax.set_xlabel("confidence max(σ(Δ), 1−σ(Δ))")
    ax.set_ylabel("fraction of picks that match the label")
    ax.set_xlim(0.48, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("Reliability")
    return fig


def _margins_plot(plt, metrics: dict):
    """The margin distribution of every model."""
    import numpy as np

    models = metrics["models"]
    fig, ax = plt.subplots(figsize=(6, 4))
    deltas = [np.asarray(m["_delta"]) for m in models.values() if m.get("_delta")]
    if deltas:
        allv = np.concatenate(deltas)
        lo, hi = np.percentile(allv, [1, 99]) if len(allv) > 1 else (allv.min() - 1, allv.max() + 1)
        if lo == hi:
            lo, hi = lo - 1, hi + 1
        edges = np.linspace(lo, hi, 31)
        for i, (n, m) in enumerate(models.items()):
            ax.hist(np.clip(m["_delta"], lo, hi), bins=edges, histtype="step", lw=1.5, color=f"C{i}", label=n)
    ax.axvline(0, color="k", lw=0.8, ls=":")
    ax.set_xlabel("margin Δ = r(preferred) − r(other)   (right of 0 = correct)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)
    ax.set_title("Margin distribution")
    return fig


def _length_bias_plot(plt, metrics: dict):
    """Length bias: accuracy when the preferred answer is longer vs shorter."""
    import numpy as np

    models = metrics["models"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    entries = [(n, m["probes"]["length"]) for n, m in models.items() if "probes" in m]
    x = np.arange(len(entries))
    for k, (key, lab) in enumerate(
        (("preferred_longer", "preferred is longer"), ("preferred_shorter", "preferred is shorter"))
    ):
        vals = [e[key]["value"] if e[key]["value"] is not None else np.nan for _, e in entries]
        err = [
            [max(0, v - (e[key]["ci"][0] or v)) for v, (_, e) in zip(vals, entries)],
            [max(0, (e[key]["ci"][1] or v) - v) for v, (_, e) in zip(vals, entries)],
        ]
        ax.bar(x + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, label=lab)
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xticks(x, [n for n, _ in entries], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% CI)")
    ax.legend(fontsize=8)
    ax.set_title("Length bias: a fair model scores alike on both")
    return fig


def write_recheck_plot(rc: dict, out: Path, name: str = RECHECK_PLOT) -> str:
    """The conflict matrix as a heat map: row A (revised for), column B (regressed), colour the
    share n/m of A's rows in which B regressed, each cell labelled n/m."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = rc["principles"]
    rows = list(rc["conflicts"]) or ["(no revision)"]
    cells = [[rc["conflicts"].get(a, {}).get(b, [0, 0]) for b in cols] for a in rows]
    rate = np.array([[n / m if m else np.nan for n, m in r] for r in cells], float)
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * len(cols), 1.4 + 0.42 * len(rows)))
    im = ax.imshow(rate, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    small = 7 if len(cols) > 8 else 9
    for i, r in enumerate(cells):
        for j, (n, m) in enumerate(r):
            if m:
                ax.text(
                    j,
                    i,
                    f"{n}/{m}",
                    ha="center",
                    va="center",
                    fontsize=small,
                    color="white" if n / m > 0.6 else "black",
                )
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=small)
    ax.set_yticks(range(len(rows)), rows, fontsize=small)
    ax.set_xlabel("principle that regressed (B)")
    ax.set_ylabel("revised for (A)")
    title = "Revising for A regressed B: n of m rows"
    if rc.get("at_chance"):
        title += "\n(judge at chance: noise)"
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03, pad=0.02, label="share of A's rows")
    fig.tight_layout()
    write_atomic(out / name, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return name
