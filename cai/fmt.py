"""Ground-floor number formatting shared by the reports and the one-line summaries."""

from __future__ import annotations


def pct(x) -> str:
    """0.1234 -> '12.3%'; None -> 'n/a'."""
    return "n/a" if x is None else f"{100 * x:.1f}%"


def pts(x) -> str:
    """A difference of proportions in percentage points, signed: 0.05 -> '+5.0'."""
    return "n/a" if x is None else f"{100 * x:+.1f}"


def ci_txt(d: dict) -> str:
    """'lo – hi' of a {"ci": [lo, hi]} entry as percentages."""
    lo, hi = d["ci"]
    return "n/a" if lo is None else f"{pct(lo)} – {pct(hi)}"


def rate_txt(r: dict | None) -> str:
    """A cai.stats.rate/agreement result as 'agreement (lo – hi)'; 'n/a' when there is none."""
    if not r or r.get("agreement") is None:
        return "n/a"
    lo, hi = r["ci95"]
    return f"{pct(r['agreement'])} ({pct(lo)} – {pct(hi)})"


def num(x, fmt="{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def duration(s) -> str:
    if s is None:
        return "unknown"
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"
