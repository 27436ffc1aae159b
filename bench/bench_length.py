"""Length-corrected rewards on the shared pairs: the default reward model, raw against corrected.

Trains the default reward model (`cai train` with every default: all-MiniLM-L6-v2, 256 tokens,
`--length-robust balance`, the length fit on its own training pairs) on the 1,300 shared HH-RLHF
harmless train pairs, then evaluates it on the 500 dev pairs twice in one scoring pass: with the
raw rewards, and with the artifact's length fit subtracted (`cai eval`'s length-corrected
column). Writes bench/RESULTS-length.md: accuracy, accuracy when the preferred answer is the
longer / the shorter one, length-balanced accuracy and the gap, raw and corrected, with 95%
intervals, the machine and its load.

    .venv/bin/python bench/bench_length.py                 # train (~10-50 min on 2 shared cores) + eval
    .venv/bin/python bench/bench_length.py --rm outputs/rm  # evaluate a model already trained so
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_line  # noqa: E402
from _results import write as write_results  # noqa: E402

sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
GOAL_GAP = 0.15


def figures(m: dict) -> dict:
    from cai.verdicts import length_balanced

    L = m["probes"]["length"]
    lb = length_balanced(m)
    return {
        "accuracy": m["accuracy"],
        "longer": L["preferred_longer"],
        "shorter": L["preferred_shorter"],
        "balanced": lb,
        "gap": L["gap"],
        "spearman": L["spearman_reward_length"],
    }


def pct(x) -> str:
    return f"{100 * x:.1f}"


def row(name: str, f: dict) -> str:
    a, g = f["accuracy"], f["gap"]
    return (
        f"| {name} | {pct(a['value'])} [{pct(a['ci'][0])}–{pct(a['ci'][1])}] | {pct(f['longer']['value'])} / "
        f"{pct(f['shorter']['value'])} | {pct(f['balanced']['value'])} | {100 * g['value']:+.1f} "
        f"[{100 * g['ci'][0]:+.1f} to {100 * g['ci'][1]:+.1f}] | {f['spearman']['value']:+.2f} |"
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rm", help="a reward model trained with cai train's defaults (skip training)")
    ap.add_argument("--limit", type=int, default=0, help="training pairs (0 = all 1,300)")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "RESULTS-length.md"))
    args = ap.parse_args()
    if not DATA.exists():
        sys.exit(f"shared HH-RLHF data not found at {DATA} (see docs/pairs-contract.md); nothing measured")
    train, dev = DATA / "train.jsonl.gz", DATA / "dev.jsonl.gz"
    load0 = os.getloadavg()[0]
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="cai-bench-length-"))
    rm = Path(args.rm) if args.rm else scratch / "rm"
    train_cmd = f"cai train --pairs {train} --eval-pairs {dev} --out {rm} --skip-bad" + (
        f" --limit {args.limit}" if args.limit else ""
    )
    train_s = None
    if not args.rm:
        cmd = [sys.executable, "-m", "cai", *train_cmd.split()[1:]]
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        train_s = time.time() - t0
    rec = json.loads((rm / "cai_train_config.json").read_text())
    lc = rec.get("length_correction") or {}
    if "x" not in lc:
        sys.exit(
            f"{rm} has no length fit ({lc.get('skipped', 'trained without it')}); train with the defaults"
        )

    from cai.evaluate import evaluate, rm_scorer
    from cai.pairset import load_pairset

    ps = load_pairset(dev, skip_bad=True)
    t1 = time.time()
    scorer, cache = rm_scorer(rm), {}

    def once(rows):  # the dev pairs are scored once; the full-strength row reuses the scores
        key = tuple(r["id"] for r in rows)
        if key not in cache:
            cache[key] = scorer(rows)
        return cache[key]

    once.length_correction = scorer.length_correction
    m = evaluate({"default RM": once}, ps, n_boot=args.bootstrap, seed=0, probe_limit=1, progress=False)
    eval_s = time.time() - t1
    once.length_correction = {**scorer.length_correction, "strength": 1.0}
    full = evaluate({"default RM": once}, ps, n_boot=args.bootstrap, seed=0, probe_limit=1, progress=False)
    model = m["models"]["default RM"]
    raw, fixed = figures(model), figures(model["length_corrected"])
    whole = figures(full["models"]["default RM"]["length_corrected"])
    change = model["length_corrected"]["vs_raw"]
    ok_gap = abs(fixed["gap"]["value"]) <= GOAL_GAP
    ok_acc = fixed["accuracy"]["value"] >= raw["accuracy"]["value"]
    import torch
    import transformers

    tr = lc["train"]
    lines = [
        "# Length-corrected rewards: the default reward model on the shared pairs",
        "",
        f"command: `.venv/bin/python bench/bench_length.py{' --rm ' + str(args.rm) if args.rm else ''}`"
        + (f" (the model: `{train_cmd}`)" if args.rm else ""),
        f"{cpu_line()}, shared with other jobs; load average {load0:.1f} "
        f"at start, {os.getloadavg()[0]:.1f} at end; torch {torch.__version__}, transformers "
        f"{transformers.__version__}",
        f"model: {rec['config']['base']} ({rec['config']['max_length']} tokens, --length-robust "
        f"{rec['config']['length_robust']}, lr {rec['config']['lr']}, {rec['config']['epochs']} epoch, seed "
        f"{rec['seed']}) on {rec['data']['train']['rows']} train pairs"
        + (
            f", trained in {train_s / 60:.0f} min"
            if train_s
            else f", {rec['metrics']['wall_s'] / 60:.0f} min"
        )
        + f"; dev: {ps.n} pairs (sha256 {ps.source['sha256'][:12]}), scored once in {eval_s:.0f} s",
        f"length fit: {lc['method']}; {lc['pairs']} training pairs, {lc['distinct_lengths']} distinct "
        f"lengths, ridge alpha {lc['ridge_alpha']:g}, "
        f"{100 * lc['share_of_margin_variance_explained']:.1f}% of the training margins' variance; "
        f"fitted in {lc['seconds']:.0f} s",
        "",
        "| dev (95% bootstrap CI) | accuracy | preferred longer / shorter | length-balanced | gap (points) | "
        "Spearman(reward, length) |",
        "|---|---|---|---|---|---|",
        row("raw rewards", raw),
        row(f"length-corrected (strength {lc.get('strength', 1.0):.2f}, the default)", fixed),
        row("length-corrected at full strength (1.00; for contrast)", whole),
        "",
        "Strength: the share of the length fit subtracted, chosen on the training pairs alone (the one "
        "that leaves the model's training-pair length gap smallest); training-pair gap at each strength: "
        + ", ".join(f"{s_:.2f}: {100 * g:+.1f}" for s_, g in lc.get("strength_search", [])[::2])
        + ".",
        "",
        f"Corrected − raw accuracy: {100 * change['diff']:+.1f} points "
        f"(95% CI {100 * change['ci'][0]:+.1f} to {100 * change['ci'][1]:+.1f}; "
        f"McNemar p = {change['mcnemar']['p']:.3g}).",
        f"On the training pairs (in-sample): accuracy {pct(tr['raw']['accuracy'])} -> "
        f"{pct(tr['corrected']['accuracy'])}, gap {100 * tr['raw']['length_gap']:+.1f} -> "
        f"{100 * tr['corrected']['length_gap']:+.1f} points.",
        "",
        f"Goal (issue 24): |gap| <= {100 * GOAL_GAP:.0f} points after correction: "
        f"{'met' if ok_gap else 'NOT met'} ({100 * fixed['gap']['value']:+.1f}); accuracy not below the "
        f"uncorrected: {'met' if ok_acc else 'NOT met'} ({pct(fixed['accuracy']['value'])} vs "
        f"{pct(raw['accuracy']['value'])}).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    write_results(out, text)  # hand-written notes (from the READING mark on) survive a rerun


if __name__ == "__main__":
    main()
