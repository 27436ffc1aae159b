"""Model backends behind one small interface (see base.py), found through entry points.

Every backend — the three cai ships included — is a class named under the ``cai.backends``
entry-point group, so an installed package adds one without editing cai::

    [project.entry-points."cai.backends"]
    mine = "my_package.backend:MyBackend"

The class declares which shared model options apply to it (``shared``: ``--batch-size``,
``--threads``, ...) and its own options (``options``, given as ``-o key=value``); ``applicable``
checks both before anything loads, and an option that does not apply is refused with one line.

``auto`` (the default) is not a backend of its own: ``resolve_backend`` turns it into one before
anything loads — hf on a GPU; on a CPU llama.cpp for GGUF models (the embedded default
included) and hf for the rest; langchain when a server URL is given.
"""

from __future__ import annotations

import os
import platform
import sys
from functools import cache

from cai.backends.base import Backend, Generation, Option  # noqa: F401
from cai.errors import InputError

GROUP = "cai.backends"


@cache
def registry() -> dict:
    """Backend name -> its entry point, from every installed package (loaded only when used)."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name)}


def names() -> tuple[str, ...]:
    return tuple(registry())


CHOICES = ("auto", *names())


@cache
def backend_class(name: str):
    """The class registered as ``name``; one line naming the package when it cannot load."""
    eps = registry()
    if name not in eps:
        hint = "" if eps else " (no backend is registered: is cai installed? pip install -e .)"
        raise InputError(f"unknown backend {name!r}; use one of {', '.join(('auto', *eps))}{hint}")
    ep = eps[name]
    where = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
    try:
        cls = ep.load()
    except Exception as e:  # noqa: BLE001 - a third party's import error, reported in one line
        raise InputError(
            f"backend {name!r} ({where}, {ep.value}) does not load: {type(e).__name__}: {e}"
        ) from None
    missing = [a for a in ("generate", "option_logprobs", "describe") if not callable(getattr(cls, a, None))]
    if missing:
        raise InputError(
            f"backend {name!r} ({where}, {ep.value}) lacks {', '.join(missing)}; see cai/backends/base.py"
        )
    return cls


def package_of(name: str) -> str | None:
    """'package version' that registered backend ``name`` (recorded in meta for third parties)."""
    ep = registry().get(name)
    return f"{ep.dist.name} {ep.dist.version}" if ep is not None and ep.dist else None


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
    name, options = resolved(name, model, options)
    return backend_class(name)(model, **options)


# Values that mean "not set": a shared option left at one of them is not asked of a backend.
_UNSET = {
    "device": ("auto", None),
    "trust_remote_code": (False, None),
    "threads": (None,),
    "base_url": (None,),
    "concurrency": (None,),
}
SHARED = ("batch_size", *_UNSET)


def applicable(name: str, options: dict) -> dict:
    """``options`` for backend ``name``, checked by it: a shared model option (``--device``,
    ``--threads``, ...) that was set but does not apply is an error (one line), never dropped in
    silence; one left unset is not passed. Each other key must be one of the backend's own
    options (``-o key=value``; text from the command line converted to the option's type)."""
    cls = backend_class(name)
    takes = tuple(getattr(cls, "shared", ()))
    own = {o.name: o for o in getattr(cls, "options", ())}
    out = {}
    for k, v in options.items():
        if k in SHARED:
            unset = k in _UNSET and v in _UNSET[k]
            if k in takes and not unset:
                out[k] = v
            elif not unset and k not in takes:
                flag = "--" + k.replace("_", "-")
                hint = (
                    " (llama.cpp runs on the CPU here; use --backend hf for a GPU)" if k == "device" else ""
                )
                raise InputError(f"{flag} does not apply to the {name} backend{hint}")
        elif k in own:
            out[k] = own[k].parse(v, name)
        else:
            takes_txt = ", ".join(own) or "none"
            raise InputError(
                f"-o {k}: the {name} backend has no option {k!r} "
                f"(its options: {takes_txt}; `cai backends` lists them)"
            )
    return out


def listing() -> list[str]:
    """`cai backends`: each registered backend, the package it comes from, the shared options it
    takes and its own ``-o`` options."""
    lines = []
    for name in names():
        lines.append(f"{name}  ({package_of(name) or registry()[name].value})")
        try:
            cls = backend_class(name)
        except InputError as e:
            lines.append(f"  unusable: {e}")
            continue
        shared = ", ".join("--" + k.replace("_", "-") for k in getattr(cls, "shared", ()))
        lines.append(f"  shared options: {shared or 'none'}")
        for o in getattr(cls, "options", ()):
            kind = "|".join(map(str, o.choices)) if o.choices else o.type.__name__
            lines.append(f"  -o {o.name}=<{kind}>  {o.help}")
    return lines


def runtime(backend) -> dict:
    """``meta.runtime`` for a loaded backend: its own ``describe()`` plus the package (and
    version) that registered it."""
    out = dict(backend.describe())
    pkg = package_of(out.get("backend") or getattr(backend, "name", ""))
    if pkg:
        out.setdefault("package", pkg)
    return out
