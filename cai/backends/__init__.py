"""Model backends behind one small interface (see base.py). A dict, not a registry."""

from __future__ import annotations

from cai.backends.base import Backend, Generation  # noqa: F401

BACKENDS = {
    "hf": "cai.backends.hf:HFBackend",
    "langchain": "cai.backends.langchain:LangChainBackend",
    "llamacpp": "cai.backends.llamacpp:LlamaCppBackend",
}


def load_backend(name: str, model: str | None, **options) -> Backend:
    """Instantiate backend ``name`` ('hf' or 'langchain') for ``model``."""
    import importlib

    from cai.errors import InputError

    if name not in BACKENDS:
        raise InputError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module), cls)(model, **options)
