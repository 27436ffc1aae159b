"""The study's step cache: each named step runs once per content key.

A step's output lives in ``<out>/steps/<step>-<key>/`` where the key is a hash of the step's
inputs (file contents, not paths) and settings. A finished step writes ``step.json`` last; a
rerun finds it and skips the step. A step killed half-way has no ``step.json`` and is run again
(its own code resumes what it can), and changing one setting changes only the keys downstream of
it. Old step folders stay as a cache.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from cai.fmt import duration
from cai.records import write_json

STEP_VERSION = 1  # bump when a step's code changes what it writes: old caches are then ignored


def content_key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _log(msg: str):
    print(f"cai compare: {msg}", file=sys.stderr, flush=True)


class Steps:
    """Runs named steps once per content key; prints progress over the whole plan."""

    def __init__(self, out: Path, plan: list[str], estimates: dict):
        self.root = out / "steps"
        self.plan, self.estimates = plan, estimates
        self.records: list[dict] = []

    def run(self, name: str, inputs: dict, fn) -> tuple[Path, dict]:
        key = content_key({"step": name, "version": STEP_VERSION, **inputs})
        d = self.root / f"{name}-{key[:12]}"
        marker = d / "step.json"
        i = len(self.records) + 1
        est = self.estimates.get(name)
        if marker.exists():
            rec = json.loads(marker.read_text())
            if rec.get("key") == key:
                _log(f"[{i}/{len(self.plan)}] {name}: cached ({d})")
                self.records.append(
                    {
                        "name": name,
                        "key": key,
                        "dir": str(d),
                        "cached": True,
                        "estimate_s": est,
                        "seconds": rec.get("seconds"),
                    }
                )
                return d, rec["result"]
        resumed = d.exists()
        d.mkdir(parents=True, exist_ok=True)
        write_json(d / "inputs.json", {"step": name, "key": key, **inputs})
        _log(
            f"[{i}/{len(self.plan)}] {name}: {'resuming' if resumed else 'running'}"
            + (f" (estimate ~{duration(est)})" if est else "")
            + f" -> {d}"
        )
        t0 = time.time()
        result = fn(d)
        secs = round(time.time() - t0, 1)
        write_json(
            marker,
            {
                "name": name,
                "key": key,
                "result": result,
                "seconds": secs,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        )  # written last: the step is done
        self.records.append(
            {"name": name, "key": key, "dir": str(d), "cached": False, "estimate_s": est, "seconds": secs}
        )
        return d, result
