"""The machine a benchmark ran on, for every RESULTS file: CPU model, cores used, ISA flags."""

from __future__ import annotations

import os
import platform

ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "asimd", "sve")


def cpu() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                model = v.strip()
            elif k in ("flags", "Features") and not flags:
                flags = set(v.split())
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "isa": [f for f in ISA if f in flags]}


def cpu_line() -> str:
    c = cpu()
    extra = (
        f"; ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"
        if "ATEN_CPU_CAPABILITY" in os.environ
        else ""
    )
    isa = ", ".join(c["isa"]) or "none of " + "/".join(ISA)
    return f"CPU: {c['model']}, {c['cores']} cores used, ISA flags: {isa}{extra}"


def load() -> float:
    return os.getloadavg()[0]
