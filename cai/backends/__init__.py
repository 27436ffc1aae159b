"""Model backends behind one small interface (see base.py). A dict, not a registry.

``auto`` (the default) is not a backend of its own: ``resolve_backend`` turns it into one before
anything loads — hf on a GPU; on a CPU llama.cpp for GGUF models (the embedded default
included) and hf for the rest; langchain when a server URL is given.
"""

from __future__ import annotations

import os
import platform
import sys

from cai.backends.base import Backend, Generation  # noqa: F401

BACKENDS = {
    "hf": "cai.backends.hf:HFBackend",
    "langchain": "cai.backends.langchain:LangChainBackend",
    "llamacpp": "cai.backends.llamacpp:LlamaCppBackend",
}
CHOICES = ("auto", *BACKENDS)


def gpu_available(device: str | None = "auto") -> bool:
    """Whether the hf backend would run on a GPU for ``device``. torch is imported only where a
    GPU driver is visible, so a CPU-only machine never pays torch's import to find out."""
    device = device or "auto"
    if device == "cpu":
        return False
    if device != "auto":
        return True  # cuda, cuda:1, mps, ...: the user asked for an accelerator
    mac = sys.platform == "darwin" and platform.machine() == "arm64"
    driver = any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/nvidia0", "/dev/kfd"))
    if not (mac or driver):
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available() or (mac and mps is not None and mps.is_available()))


_NOTED: set = set()  # models the note below was printed for (once per process)


def resolve_backend(name: str, model: str | None, *, device: str | None = "auto", base_url=None) -> str:
    """The backend ``name`` stands for: itself, or for ``auto`` the engine that runs ``model``
    fastest here (one line on stderr when a CPU runs a non-GGUF model through hf)."""
    if name != "auto":
        return name
    if base_url:
        return "langchain"
    if gpu_available(device):
        return "hf"
    from cai.backends.gguf_weights import is_gguf

    if is_gguf(model):
        return "llamacpp"
    if model in _NOTED:
        return "hf"
    _NOTED.add(model)
    print(
        f"cai: note: {model} is not a GGUF file, so it runs on transformers (hf) on this CPU; a GGUF "
        "copy of it (llama.cpp's convert_hf_to_gguf.py) would run several times faster with "
        "--backend llamacpp",
        file=sys.stderr,
    )
    return "hf"


def resolved(name: str, model: str | None, options: dict) -> tuple[str, dict]:
    """(backend, options) with ``auto`` resolved and the options it takes (see applicable)."""
    name = resolve_backend(name, model, device=options.get("device"), base_url=options.get("base_url"))
    return name, applicable(name, options)


def resolve_config(cfg):
    """A stage config with ``backend`` resolved (``auto``) and ``backend_options`` cut to what that
    backend takes; the stages call it after validating their inputs, before anything loads."""
    from dataclasses import replace

    name, options = resolved(cfg.backend, cfg.model, cfg.backend_options)
    return replace(cfg, backend=name, backend_options=options)


def load_backend(name: str, model: str | None, **options) -> Backend:
    """Instantiate backend ``name`` (or ``auto``, see resolve_backend) for ``model``."""
    import importlib

    from cai.errors import InputError

    name, options = resolved(name, model, options)
    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; use one of {', '.join(CHOICES)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, **options)


# The shared model options each backend takes (the rest of ModelOptions does not apply to it).
_TAKES = {
    "hf": ("batch_size", "device", "trust_remote_code", "threads"),
    "llamacpp": ("batch_size", "threads"),
    "langchain": ("batch_size", "base_url", "concurrency"),
}
# Values that mean "not set": an option left at one of them is not asked of a backend.
_UNSET = {
    "device": ("auto", None),
    "trust_remote_code": (False, None),
    "threads": (None,),
    "base_url": (None,),
    "concurrency": (None,),
}


def applicable(name: str, options: dict) -> dict:
    """``options`` for backend ``name``: a shared model option (``--device``, ``--threads``, ...)
    that was set but does not apply is an error (one line), never dropped in silence; one left
    unset is not passed. Backend-specific keys (Python callers) go through as they are."""
    from cai.errors import InputError

    takes = _TAKES.get(name)
    if takes is None:
        return dict(options)
    shared = set(_UNSET) | {"batch_size"}
    out = {}
    for k, v in options.items():
        unset = k in _UNSET and v in _UNSET[k]
        if k not in shared or (k in takes and not unset):
            out[k] = v
        elif not unset and k not in takes:
            flag = "--" + k.replace("_", "-")
            hint = " (llama.cpp runs on the CPU here; use --backend hf for a GPU)" if k == "device" else ""
            raise InputError(f"{flag} does not apply to the {name} backend{hint}")
    return out
