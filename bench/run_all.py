"""`make bench`: every benchmark with its default (CPU-sized) settings, one after another.

Each prints ratios against a baseline measured in the same run and writes bench/RESULTS-*.md.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

for script in (
    "bench_generate.py",
    "bench_label.py",
    "bench_train.py",
    "bench_train_sweep.py",
    "bench_length.py",
    "bench_peer.py",
    "bench_memory.py",
    "bench_scaling.py",
    "bench_engines.py",
    "bench_recheck.py",
    "bench_size.py",
    "bench_fleet.py",
):
    print(f"\n=== {script} ===", flush=True)
    subprocess.run([sys.executable, str(HERE / script)], check=True)
