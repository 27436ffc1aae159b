"""Reward-model recipe sweep on the shared HH-RLHF harmless data: train on train.jsonl.gz (1,300
human pairs), measure on dev.jsonl.gz (500 pairs; never the test data).

For every recipe it reports dev accuracy with its 95% Wilson interval, accuracy when the preferred
response is the longer / the shorter one, their mean (length-balanced accuracy), Spearman(reward,
response length) over all 1,000 dev responses, wall time and peak RSS, and writes the table to
bench/RESULTS-train.md (the section between the SWEEP markers; the rest of the file is kept).

Two families, because full fine-tunes of MiniLM take ~15 min each on this 2-core shared box:

- full: `train_reward_model` (what `cai train` runs), one subprocess per recipe so wall time and
  peak RSS are the recipe's own. Results are cached per recipe in outputs/bench-train-sweep/ (JSON),
  so a rerun only trains what is missing; `--fresh` retrains.
- frozen: the encoder frozen, only BERT's pooler + the reward head trained (what `--freeze-base`
  would train). The encoder's [CLS] states are computed once per max-length and cached; each head
  then trains in seconds, so this family carries the fine grid (lr, epochs, warmup, weight decay,
  length option, seeds).

    # reduced grid (`make bench`): the full fine-tunes in REDUCED + any cached ones,
    # the whole frozen grid (encoding 128/256/512 once), the label-noise study
    .venv/bin/python bench/bench_train_sweep.py
    .venv/bin/python bench/bench_train_sweep.py --full-grid     # every full fine-tune in FULL_RECIPES
    .venv/bin/python bench/bench_train_sweep.py --only full:odin-512   # one recipe
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless"
CACHE = ROOT / "outputs" / "bench-train-sweep"  # git-ignored: cached features and full-FT results
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# name -> TrainConfig overrides. The first is today's default (max_length from the base: 256).
FULL_RECIPES = {
    "odin-512": dict(max_length=512, length_robust="odin"),
    "none-256": dict(max_length=256, length_robust="none"),
    "balance-512": dict(max_length=512, length_robust="balance"),
    "none-512": dict(max_length=512, length_robust="none"),
    "odin+balance-512": dict(max_length=512, length_robust="odin+balance"),
    "balance-512-lr2e-4": dict(max_length=512, length_robust="balance", lr=2e-4),
    "balance-256": dict(max_length=256, length_robust="balance"),
}
REDUCED = (
    "balance-512",
)  # the full fine-tune `make bench` trains when nothing is cached (the default recipe)


def run_full(name: str, overrides: dict, seed: int = 0) -> dict:
    """One full fine-tune in this process (called in a child): dev metrics, wall, peak RSS."""
    from cai.configs import TrainConfig
    from cai.train import train_reward_model

    work = Path(tempfile.mkdtemp(prefix="cai-sweep-"))
    kw = dict(
        pairs=str(DATA / "train.jsonl.gz"),
        out=str(work / "rm"),
        eval_pairs=str(DATA / "dev.jsonl.gz"),
        seed=seed,
        save_steps=10_000,
        skip_bad=True,
    )
    kw.update(overrides)
    t0 = time.time()
    m = train_reward_model(TrainConfig(**kw), progress=False)
    rec = {
        "name": name,
        "family": "full",
        "config": overrides,
        "seed": seed,
        "wall_s": round(time.time() - t0, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "metrics": m,
        "load_avg": os.getloadavg()[0],
    }
    card = (work / "rm" / "README.md").read_text()
    rec["card_length_section"] = card.split("## Length", 1)[1].split("##", 1)[0].strip()
    return rec


def full_result(name: str, seed: int, fresh: bool) -> dict | None:
    path = CACHE / f"full-{name}-s{seed}.json"
    if path.exists() and not fresh:
        return json.loads(path.read_text())
    CACHE.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", name, "--seed", str(seed)]
    print(f"== full fine-tune {name} seed {seed}", flush=True)
    r = subprocess.run(cmd)
    if r.returncode != 0 or not path.exists():
        print(f"   failed (exit {r.returncode})", flush=True)
        return None
    return json.loads(path.read_text())


def row_from_full(rec: dict) -> dict:
    from cai.stats import wilson_interval

    m = rec["metrics"]
    n = m["eval_pairs"]
    lo, hi = wilson_interval(m["eval_accuracy"] * n, n)
    return {
        "recipe": f"full FT · {rec['name']}",
        "seed": rec["seed"],
        "acc": m["eval_accuracy"],
        "ci": (lo, hi),
        "longer": m.get("eval_acc_pref_longer"),
        "shorter": m.get("eval_acc_pref_shorter"),
        "balanced": m.get("eval_balanced_accuracy"),
        "spearman": m.get("eval_spearman_reward_length"),
        "wall_s": rec["wall_s"],
        "rss_mb": rec["peak_rss_mb"],
    }


# ----------------------------------------------------------------------------- frozen encoder


def encode_split(path, max_length: int, threads: int = 1):
    """[CLS] last hidden states (what BERT's pooler reads) and mean-pooled states of every response
    of every pair, rendered and truncated exactly as `cai train` does; plus labels and lengths."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from cai.encode import PairEncoder, pad_batch, tokenize_pairs
    from cai.models import default_reward_base
    from cai.train import read_training_rows

    torch.set_num_threads(threads)
    base = str(default_reward_base())
    tok = AutoTokenizer.from_pretrained(base)
    rows, _ = read_training_rows(path, None, "soft", "training", skip_bad=True)
    items = tokenize_pairs(rows, PairEncoder(tok, max_length))
    seqs = [s for it in items for s in (it["chosen_ids"], it["rejected_ids"])]
    enc = AutoModel.from_pretrained(base, dtype=torch.float32).eval()
    cls = np.zeros((len(seqs), enc.config.hidden_size), np.float32)
    mean = np.zeros_like(cls)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    with torch.inference_mode():
        for k in range(0, len(order), 32):
            idx = order[k : k + 32]
            ids, mask = pad_batch([seqs[i] for i in idx], tok.pad_token_id)
            h = enc(input_ids=ids, attention_mask=mask).last_hidden_state
            cls[idx] = h[:, 0].numpy()
            m = mask.unsqueeze(-1).float()
            mean[idx] = ((h * m).sum(1) / m.sum(1)).numpy()
    return {
        "cls": cls.reshape(len(items), 2, -1),
        "mean": mean.reshape(len(items), 2, -1),
        "p": np.array([it["p_chosen"] for it in items], np.float32),
        "lengths": np.array([[it["len_chosen"], it["len_rejected"]] for it in items], np.float32),
    }


def cached_features(max_length: int, threads: int = 1) -> dict:
    import numpy as np

    path = CACHE / f"feats-{max_length}.npz"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        tr, dv = (
            encode_split(DATA / "train.jsonl.gz", max_length, threads),
            encode_split(DATA / "dev.jsonl.gz", max_length, threads),
        )
        np.savez(
            path,
            **{f"train_{k}": v for k, v in tr.items()},
            **{f"dev_{k}": v for k, v in dv.items()},
            encode_s=np.array(time.time() - t0),
        )
        print(f"   encoded train+dev at {max_length} tokens in {time.time() - t0:.0f}s", flush=True)
    z = np.load(path)
    return {k: z[k] for k in z.files}


def train_head(
    f: dict,
    *,
    lr: float,
    epochs: float,
    warmup: float = 0.1,
    weight_decay: float = 0.0,
    length_robust: str = "none",
    length_weight: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    feature: str = "cls",
) -> dict:
    """Train BERT's pooler + a new reward head on cached frozen-encoder features, with cai's own
    loss (RewardModelTrainer.compute_loss), pair weights and AdamW/linear schedule; dev metrics."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from cai.pairmetrics import length_metrics, pair_metrics
    from cai.reward import RewardModelTrainer
    from cai.train import balance_weights

    torch.manual_seed(seed)
    odin = "odin" in length_robust
    k = 2 if odin else 1
    pooler_w, pooler_b = _pooler()
    dim = f[f"train_{feature}"].shape[-1]

    class Head(torch.nn.Module):
        def __init__(self, x):
            super().__init__()
            self.x = x
            self.config = SimpleNamespace(num_labels=k)
            self.pooler = torch.nn.Linear(dim, dim)
            if feature == "cls":  # BERT's pretrained pooler, as BertForSequenceClassification has it
                with torch.no_grad():
                    self.pooler.weight.copy_(pooler_w)
                    self.pooler.bias.copy_(pooler_b)
            self.drop = torch.nn.Dropout(0.1)
            self.classifier = torch.nn.Linear(dim, k)
            torch.nn.init.normal_(self.classifier.weight, std=0.02)
            torch.nn.init.zeros_(self.classifier.bias)

        def forward(self, input_ids, attention_mask=None):
            return SimpleNamespace(
                logits=self.classifier(self.drop(torch.tanh(self.pooler(self.x[input_ids]))))
            )

    xtr = torch.tensor(f[f"train_{feature}"]).reshape(-1, dim)  # pair i: rows 2i (chosen), 2i+1 (rejected)
    ptr = torch.tensor(f["train_p"])
    ltr = torch.tensor(f["train_lengths"])
    n = len(ptr)
    items = [
        {"p_chosen": float(p), "len_chosen": float(a), "len_rejected": float(b)}
        for p, (a, b) in zip(ptr, ltr)
    ]
    w = torch.tensor(
        balance_weights(items) if "balance" in length_robust else np.ones(n), dtype=torch.float32
    )
    model = Head(xtr)
    decay = [p for nme, p in model.named_parameters() if not nme.endswith("bias")]
    nodecay = [p for nme, p in model.named_parameters() if nme.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": nodecay, "weight_decay": 0.0}], lr=lr
    )
    steps_per_epoch = -(-n // batch_size)
    total = max(1, round(steps_per_epoch * epochs))
    warm = warmup if warmup >= 1 else int(np.ceil(total * warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else max(0.0, (total - s) / max(1, total - warm))
    )
    strata = np.sign(ptr.numpy() - 0.5) * np.sign(ltr[:, 0].numpy() - ltr[:, 1].numpy())
    sign = -1.0 if (strata < 0).sum() > (strata > 0).sum() else 1.0  # as train_reward_model sets it
    trainer = SimpleNamespace(
        hard_labels=False,
        margin=0.0,
        center_rewards=0.0,
        odin=odin,
        length_weight=length_weight,
        length_sign=sign,
        seen=None,
    )
    g = torch.Generator().manual_seed(seed)
    step, order = 0, torch.randperm(n, generator=g)
    model.train()
    while step < total:
        pos = (step % steps_per_epoch) * batch_size
        if pos == 0 and step:
            order = torch.randperm(n, generator=g)
        b = order[pos : pos + batch_size]
        inputs = {
            "input_ids": torch.cat([2 * b, 2 * b + 1]),
            "attention_mask": None,
            "p_chosen": ptr[b],
            "pair_lengths": ltr[b],
            "pair_weight": w[b],
        }
        loss = RewardModelTrainer.compute_loss(trainer, model, inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        step += 1
    model.eval()
    model.x = torch.tensor(f[f"dev_{feature}"]).reshape(-1, dim)
    with torch.no_grad():
        r = model(torch.arange(len(model.x))).logits[:, 0].reshape(-1, 2).numpy()
    m = pair_metrics(r, f["dev_p"])
    m.update(length_metrics(r, f["dev_p"], f["dev_lengths"]))
    return m


_POOLER = {}


def _pooler():
    if not _POOLER:
        from safetensors.torch import load_file

        from cai.models import default_reward_base

        sd = load_file(str(Path(default_reward_base()) / "model.safetensors"))
        key = next(k for k in sd if k.endswith("pooler.dense.weight"))
        _POOLER["w"], _POOLER["b"] = sd[key], sd[key.replace("weight", "bias")]
    return _POOLER["w"], _POOLER["b"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--full-grid", action="store_true", help="train every recipe in FULL_RECIPES (not only REDUCED)"
    )
    ap.add_argument("--only", help="full:<recipe> — train just this one")
    ap.add_argument("--fresh", action="store_true", help="retrain recipes that have a cached result")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--encode", type=int, nargs="*", help="only cache the frozen encoder's features at these max-lengths"
    )
    ap.add_argument(
        "--lengths", type=int, nargs="*", default=[128, 256, 512], help="max-lengths of the frozen grid"
    )
    ap.add_argument(
        "--cached-full-only", action="store_true", help="train no full fine-tune; report the cached ones"
    )
    ap.add_argument(
        "--no-encode", action="store_true", help="skip max-lengths whose features are not cached yet"
    )
    ap.add_argument("--seeds", type=int, default=2, help="seeds for the frozen finalists and the noise study")
    ap.add_argument("--results", default=str(ROOT / "bench" / "RESULTS-train.md"))
    a = ap.parse_args()
    if a.child:
        import torch

        torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "2")))
        rec = run_full(a.child, FULL_RECIPES[a.child], a.seed)
        (CACHE / f"full-{a.child}-s{a.seed}.json").write_text(json.dumps(rec, indent=1))
        return
    if not (DATA / "train.jsonl.gz").exists():
        print(f"skipped: shared HH-RLHF data not found at {DATA}")
        return
    if a.encode:
        for L in a.encode:
            cached_features(L, int(os.environ.get("SWEEP_THREADS", "1")))
        return
    if a.only:
        fam, name = a.only.split(":", 1)
        full_result(name, a.seed, a.fresh)
        return
    names = (
        list(FULL_RECIPES)
        if a.full_grid
        else [n for n in FULL_RECIPES if n in REDUCED or (CACHE / f"full-{n}-s0.json").exists()]
    )
    global FRESH
    FRESH = a.fresh
    if a.cached_full_only:
        names = [n for n in FULL_RECIPES if (CACHE / f"full-{n}-s{a.seed}.json").exists()]
    full_rows = [row_from_full(r) for n in names if (r := full_result(n, a.seed, a.fresh))]
    import torch

    torch.set_num_threads(1)  # tiny matmuls: more threads only spin on a shared box
    lengths = [L for L in a.lengths if (CACHE / f"feats-{L}.npz").exists() or not a.no_encode]
    frozen_rows, best = frozen_sweep(lengths, a.seeds)
    noise_rows = noise_study(best, a.seeds) if best else []
    text = render(full_rows, frozen_rows, noise_rows, best, " ".join(sys.argv[1:]))
    print(text)
    if not a.no_write:
        write_section(Path(a.results), text)
        print(f"written to {a.results}")


# ----------------------------------------------------------------------------- the frozen grid


def selection_key(m: dict):
    """Rank recipes by the sweep's goal: within |gap| <= 25 points and |Spearman| <= 0.4, the highest
    length-balanced accuracy; recipes outside those bounds rank below every recipe inside them."""
    ok = abs(m.get("length_gap", 1)) <= 0.25 and abs(m.get("spearman_reward_length", 1)) <= 0.4
    return (ok, round(m.get("balanced_accuracy", 0), 3), m["accuracy"])


def _mean_rows(runs: list[dict]) -> dict:
    import numpy as np

    keys = (
        "accuracy",
        "acc_pref_longer",
        "acc_pref_shorter",
        "balanced_accuracy",
        "length_gap",
        "spearman_reward_length",
        "head_s",
    )
    out = {k: float(np.mean([r[k] for r in runs])) for k in keys}
    out["acc_sd"] = float(np.std([r["accuracy"] for r in runs])) if len(runs) > 1 else None
    out["bal_sd"] = float(np.std([r["balanced_accuracy"] for r in runs])) if len(runs) > 1 else None
    out["pairs"] = runs[0]["pairs"]
    out["seeds"] = len(runs)
    return out


def frozen_sweep(lengths, n_seeds: int):
    """Coarse grid at seed 0 (max-length x lr x epochs x length option), then warmup / weight decay /
    length weight around the best, then every finalist over `n_seeds` seeds."""
    import itertools

    results = {}  # (L, recipe tuple) -> list of runs (one per seed)
    store = CACHE / "frozen-runs.json"  # every head run, so a rerun only trains what is new
    done = {} if FRESH or not store.exists() else json.loads(store.read_text())

    def run(L, seed=0, **hp):
        key = (L, tuple(sorted(hp.items())))
        have = results.setdefault(key, [])
        if any(r["seed"] == seed for r in have):
            return next(r for r in have if r["seed"] == seed)
        skey = json.dumps([L, sorted(hp.items()), seed])
        if skey not in done:
            t0 = time.time()
            m = train_head(FEATS[L], seed=seed, **hp)
            m.update(seed=seed, head_s=time.time() - t0)
            done[skey] = m
            store.write_text(json.dumps(done))
        have.append(done[skey])
        return done[skey]

    for L in lengths:
        FEATS[L] = cached_features(L)
        for (lr, ep), mode in itertools.product(GRID, MODES):
            run(L, lr=lr, epochs=ep, length_robust=mode, warmup=0.1, weight_decay=0.0)
        print(f"   frozen grid at {L} tokens done", flush=True)
    if not results:
        return [], None
    coarse = sorted(results, key=lambda k: selection_key(results[k][0]), reverse=True)
    for L, hp in coarse[:1]:  # refine around the best
        hp = dict(hp)
        for wu, wd in ((0.0, 0.0), (0.3, 0.0), (0.1, 0.01), (0.1, 0.1)):
            run(L, **(hp | {"warmup": wu, "weight_decay": wd}))
        if "odin" in hp["length_robust"]:
            for lw in (0.3, 3.0):
                run(L, **(hp | {"length_weight": lw}))
    ranked = sorted(results, key=lambda k: selection_key(results[k][0]), reverse=True)
    # seeds for the finalists and for the best plain (no length option) recipe per max-length
    finalists = ranked[:2]
    for L in lengths:
        plain = [k for k in ranked if k[0] == L and dict(k[1])["length_robust"] == "none"]
        finalists += plain[:1]
    finalists = list(dict.fromkeys(finalists))
    for key in finalists:
        for seed in range(1, n_seeds):
            run(key[0], seed=seed, **dict(key[1]))
    rows = []
    for key in finalists:
        m = _mean_rows(results[key])
        rows.append({"L": key[0], "hp": dict(key[1]), **m})
    rows.sort(
        key=lambda r: selection_key(
            {
                "length_gap": r["length_gap"],
                "spearman_reward_length": r["spearman_reward_length"],
                "balanced_accuracy": r["balanced_accuracy"],
                "accuracy": r["accuracy"],
            }
        ),
        reverse=True,
    )
    coarse_rows = [{"L": k[0], "hp": dict(k[1]), **_mean_rows(results[k][:1])} for k in ranked]
    best = rows[0] if rows else None
    return {"finalists": rows, "all": coarse_rows}, best


FEATS: dict = {}
# the coarse frozen grid: (lr, epochs) x length option, at every max-length (sized for a shared 2-core box)
GRID = [(1e-3, 5), (3e-3, 5), (1e-3, 20)]
MODES = ("none", "balance", "odin")
NOISE = (0.0, 0.2, 0.4)
FRESH = False


# ----------------------------------------------------------------------------- label noise, soft vs hard


def noisy_labels(n: int, q: float, seed: int):
    """A calibrated noisy labeller over n human pairs (all 'chosen is better'): per pair a confidence
    c ~ U(1-2q, 1) (mean 1-q), and the label is flipped with probability 1-c. Returns the observed
    side (+1 chosen / -1 rejected), c, and which pairs were flipped."""
    import numpy as np

    rng = np.random.default_rng(1000 + seed)
    c = rng.uniform(1 - 2 * q, 1.0, n) if q else np.ones(n)
    flipped = rng.random(n) > c
    return np.where(flipped, -1.0, 1.0), c, flipped


def noise_study(best: dict, n_seeds: int) -> list[dict]:
    """Train the best frozen recipe on human labels with a known share flipped, as hard labels (the
    observed side), as uniform soft labels (1-q toward the observed side: label smoothing at the true
    noise rate, as in conservative DPO) and as calibrated per-pair soft labels (c toward the observed
    side). Same pairs, same flips in all three."""
    import numpy as np

    f0 = FEATS[best["L"]]
    store = CACHE / "frozen-runs.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    rows = []
    for q in NOISE:
        per = {"hard": [], "soft (uniform 1-q)": [], "soft (calibrated c)": []}
        share = []
        for seed in range(n_seeds):
            side, c, flipped = noisy_labels(len(f0["train_p"]), q, seed)
            share.append(flipped.mean())
            for name, p in (
                ("hard", side > 0),
                ("soft (uniform 1-q)", np.where(side > 0, 1 - q, q)),
                ("soft (calibrated c)", np.where(side > 0, c, 1 - c)),
            ):
                skey = json.dumps(["noise", best["L"], sorted(best["hp"].items()), q, name, seed])
                if skey not in done:
                    done[skey] = train_head(
                        dict(f0, train_p=np.asarray(p, np.float32)), seed=seed, **best["hp"]
                    ) | {"head_s": 0.0}
                    store.write_text(json.dumps(done))
                per[name].append(done[skey])
        for name, runs in per.items():
            rows.append({"q": q, "share": float(np.mean(share)), "labels": name, **_mean_rows(runs)})
        print(f"   noise {q:.0%} done", flush=True)
    return rows


# ----------------------------------------------------------------------------- the report


def _fmt_hp(hp: dict) -> str:
    parts = [
        f"lr {hp['lr']:g}",
        f"{hp['epochs']:g} ep",
        f"warmup {hp['warmup']:g}",
        f"wd {hp['weight_decay']:g}",
        hp["length_robust"],
    ]
    if "odin" in hp["length_robust"] and hp.get("length_weight", 1.0) != 1.0:
        parts.append(f"λ {hp['length_weight']:g}")
    return ", ".join(parts)


def _pct(x, sd=None):
    if x is None:
        return "—"
    return f"{100 * x:.1f}" + (f" ±{100 * sd:.1f}" if sd is not None else "")


def render(full_rows, frozen, noise_rows, best, argv: str) -> str:
    from cai.stats import wilson_interval

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    L = [
        "## Recipe sweep (shared dev, 499 pairs; trained on the 1,297 valid shared train pairs)",
        "",
        f"command: `{' '.join(['.venv/bin/python', 'bench/bench_train_sweep.py', *argv.split()])}`"
        + " (load average at end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        "",
        "Columns: dev accuracy [95% Wilson CI]; accuracy when the human-preferred response is the longer / "
        "the shorter; length-balanced accuracy (mean of the two); Spearman(reward, response characters) "
        "over all 998 dev responses; wall time; peak RSS. Goal: balanced ≥ 62, |longer − shorter| ≤ 25 "
        "points, |Spearman| ≤ 0.4, accuracy ≥ 62.",
        "",
    ]
    L += [
        "### Full fine-tuning (`train_reward_model`: lr 5e-5, 1 epoch, warmup 0.1, wd 0, batch 16 unless "
        "the recipe says otherwise; one subprocess each)",
        "",
        "| recipe | seed | accuracy [95% CI] | pref. longer | pref. shorter | balanced | Spearman | "
        "wall (s) | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in full_rows:
        L.append(
            f"| {r['recipe']} | {r['seed']} | {_pct(r['acc'])} [{_pct(r['ci'][0])}–{_pct(r['ci'][1])}] | "
            f"{_pct(r['longer'])} | {_pct(r['shorter'])} | {_pct(r['balanced'])} | {r['spearman']:+.2f} | "
            f"{r['wall_s']:.0f} | {r['rss_mb']} |"
        )
    if not full_rows:
        L.append("| (none cached: run with --full-grid) | | | | | | | | |")
    if frozen:
        enc = {k: float(FEATS[k]["encode_s"]) for k in FEATS}
        L += [
            "",
            "### Frozen encoder: BERT's pooler + reward head on cached [CLS] states (seeds: mean ± sd)",
            "",
            "Encoding train + dev once: "
            + ", ".join(f"{k} tokens {v:.0f} s" for k, v in sorted(enc.items()))
            + "; each head then trains in the 'head (s)' column. "
            f"Peak RSS of the whole sweep process {peak:.0f} MB.",
            "",
            "| max len | recipe | seeds | accuracy [95% CI] | pref. longer | pref. shorter | balanced | "
            "Spearman | head (s) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in frozen["finalists"]:
            n = r["pairs"]
            lo, hi = wilson_interval(r["accuracy"] * n, n)
            L.append(
                f"| {r['L']} | {_fmt_hp(r['hp'])} | {r['seeds']} | "
                f"{_pct(r['accuracy'], r['acc_sd'])} [{_pct(lo)}–{_pct(hi)}] | "
                f"{_pct(r['acc_pref_longer'])} | {_pct(r['acc_pref_shorter'])} | "
                f"{_pct(r['balanced_accuracy'], r['bal_sd'])} | "
                f"{r['spearman_reward_length']:+.2f} | {r['head_s']:.1f} |"
            )
        L += [
            "",
            "<details><summary>Every frozen-encoder run at seed 0 (coarse grid + refinements), best "
            "first</summary>",
            "",
            "Ranked by the goal: runs inside |gap| ≤ 25 points and |Spearman| ≤ 0.4 first (by balanced "
            "accuracy), then the rest.",
            "",
            "| max len | recipe | accuracy | longer | shorter | balanced | Spearman | "
            "inside the length bounds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in frozen["all"]:
            inside = abs(r["length_gap"]) <= 0.25 and abs(r["spearman_reward_length"]) <= 0.4
            L.append(
                f"| {r['L']} | {_fmt_hp(r['hp'])} | {_pct(r['accuracy'])} | {_pct(r['acc_pref_longer'])} | "
                f"{_pct(r['acc_pref_shorter'])} | {_pct(r['balanced_accuracy'])} | "
                f"{r['spearman_reward_length']:+.2f} | "
                f"{'yes' if inside else 'no'} |"
            )
        L += ["", "</details>"]
    if noise_rows:
        L += [
            "",
            f"### Soft vs hard labels under label noise (frozen encoder, {best['L']} tokens, "
            f"{_fmt_hp(best['hp'])}; "
            f"mean over {noise_rows[0]['seeds']} noise draws/seeds)",
            "",
            "A calibrated noisy labeller: per pair a confidence c ~ U(1−2q, 1), label flipped with "
            "probability 1−c (realised share below). hard = the observed side; soft (uniform) = 1−q toward "
            "it (label smoothing at the true rate); soft (calibrated) = c toward it. Same pairs and flips "
            "for all three.",
            "",
            "| flip rate q | realised | labels | accuracy | balanced | Spearman |",
            "|---|---|---|---|---|---|",
        ]
        for r in noise_rows:
            L.append(
                f"| {r['q']:.0%} | {r['share']:.1%} | {r['labels']} | {_pct(r['accuracy'], r['acc_sd'])} | "
                f"{_pct(r['balanced_accuracy'], r['bal_sd'])} | {r['spearman_reward_length']:+.2f} |"
            )
    return "\n".join(L) + "\n"


START, END = "<!-- SWEEP START (bench/bench_train_sweep.py rewrites this section) -->", "<!-- SWEEP END -->"


def write_section(path: Path, text: str):
    old = path.read_text() if path.exists() else ""
    block = f"{START}\n{text}{END}\n"
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END) + 1 :]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    path.write_text(new)


if __name__ == "__main__":
    main()
