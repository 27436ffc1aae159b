"""One source per option: a stage's config dataclass declares each option once.

A field becomes a command-line option when its metadata has ``help``; its name, type,
default and help text all come from the field, so the dataclass, the CLI and ``--help`` never
disagree. ``opt()`` builds such a field::

    @dataclass
    class TrainConfig:
        lr: float = opt(5e-5, "Peak learning rate.")
        limit: int | None = opt(None, "Only the first N pairs.", min=1)

    @cli.command()
    @click_options(TrainConfig)
    def train(**kw):
        train_reward_model(TrainConfig(**kw))

``check_config`` enforces the same bounds (``min``, ``max``, ``choices``) for callers of the Python API,
so `--limit 0` means the same thing — an error — in every command. This module imports only
click and the standard library, and only when building options.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing

from cai.errors import InputError


def opt(default=dataclasses.MISSING, help: str = "", *, factory=None, **meta):
    """A dataclass field that is also a CLI option.

    meta: ``min`` / ``max`` (numbers: the smallest / largest allowed value; ``max_why`` says why),
    ``choices``, ``cli`` (option names, e.g. ``("--model", "-m")``), ``negatable``
    (``--x/--no-x``), ``flag_values`` (several flags that set one field, e.g.
    ``{"--bf16": "bf16"}``), ``parse`` (a function turning the text
    into the value, raising ValueError with a message), ``metavar``, ``path`` (a file path).
    """
    md = {"help": help, **meta}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    return dataclasses.field(default=default, metadata=md)


def option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _fields(cls, only=None, exclude=()):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help") or f.name in exclude or (only is not None and f.name not in only):
            continue
        yield f, hints[f.name]


def _base_type(tp):
    """int | None -> int; list[str] -> (list, str); tuple[float, float] -> (tuple, float, 2)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else (str,)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (origin, args[0], len(args) if origin is tuple else None)
    return (tp,)


def click_options(cls, *, only=None, exclude=(), rename: dict | None = None, required: tuple = ()):
    """A decorator adding one click option per help-carrying field of ``cls``.

    rename: field name -> option name without dashes (e.g. ``{"batch_size": "train_batch_size"}``)
    for a command where two configs would otherwise share a name; the parameter name becomes
    the new name too. Fields without a default are required.
    """
    import click

    rename = rename or {}

    def decorate(fn):
        for f, tp in reversed(list(_fields(cls, only, exclude))):
            md = f.metadata
            name = rename.get(f.name, f.name)
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            default = (
                f.default
                if f.default is not dataclasses.MISSING
                else (f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            )
            decls = list(md.get("cli") or [option_name(name)])
            kw: dict = {"help": md["help"]}
            base = _base_type(tp)
            if "flag_values" in md:
                for i, (flag, value) in enumerate(md["flag_values"].items()):
                    fn = click.option(
                        flag,
                        name,
                        flag_value=value,
                        default=default if i == 0 else None,
                        help=md["flag_help"][value],
                    )(fn)
                continue
            if base[0] is bool:
                if md.get("negatable"):
                    stem = decls[0][2:]
                    decls = [f"--{stem}/--no-{stem}"]
                    kw.update(default=default, show_default=True)
                else:
                    kw.update(is_flag=True, default=bool(default))
            elif base[0] is list:
                kw.update(multiple=True, type=click.Path() if md.get("path") else base[1])
            elif base[0] is tuple:
                kw.update(nargs=base[2], type=base[1], default=default, show_default=True)
            else:
                if "choices" in md:
                    kw["type"] = click.Choice(list(md["choices"]))
                elif md.get("path"):
                    kw["type"] = click.Path()
                elif "parse" in md:
                    kw["type"] = str
                else:
                    kw["type"] = base[0]
                kw["default"] = default
                kw["show_default"] = default not in (None, "", False)
            if "parse" in md:
                kw["callback"] = _parser(md["parse"])
                if default is not None:
                    kw["default"] = md.get("cli_default", str(default))
            if not has_default or f.name in required:
                kw["required"] = True
                kw.pop("default", None)
            if "metavar" in md:
                kw["metavar"] = md["metavar"]
            fn = click.option(*decls, name, **kw)(fn)
        return fn

    return decorate


def _parser(parse):
    import click

    def callback(ctx, param, value):
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return callback


def pick(cls, kwargs: dict, rename: dict | None = None) -> dict:
    """The entries of ``kwargs`` that are option fields of ``cls`` (undoing ``rename``)."""
    back = {v: k for k, v in (rename or {}).items()}
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for k, v in kwargs.items():
        if k in (rename or {}) and k not in back:
            continue  # under this command the field's option has another name; this one is another config's
        k = back.get(k, k)
        if k in names:
            out[k] = list(v) if isinstance(v, tuple) and k in _list_fields(cls) else v
    return out


def _list_fields(cls) -> set[str]:
    hints = typing.get_type_hints(cls)
    return {f.name for f in dataclasses.fields(cls) if typing.get_origin(hints[f.name]) is list}


def check_config(cfg, rename: dict | None = None) -> None:
    """Bounds from the fields' metadata, for every caller: counts and limits are >= their ``min``
    (and <= their ``max``: seeds, ports), numbers are finite, choices are one of the listed.
    Raises InputError naming the option."""
    rename = rename or {}
    for f, _ in _fields(type(cfg)):
        v = getattr(cfg, f.name)
        name = (
            option_name(rename[f.name])
            if f.name in rename
            else (f.metadata.get("cli") or [option_name(f.name)])[0]
        )
        if v is None or isinstance(v, bool):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise InputError(f"{name} must be a finite number, not {v}")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(v, (int, float)) and ((lo is not None and v < lo) or (hi is not None and v > hi)):
            bound = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"between {lo} and {hi}"
            why = f" ({f.metadata['max_why']})" if f.metadata.get("max_why") else ""
            raise InputError(f"{name} must be {bound}{why}, not {v}")
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise InputError(f"{name} must be one of {', '.join(map(str, choices))}, not {v!r}")


def _count_or_all(value, what: str):
    """'all' -> None, 'K' -> K >= 1, else ValueError naming ``what``."""
    if value is None or str(value).lower() == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise ValueError(f"{value!r}: pass a number of {what} (1, 2, ...) or 'all'")
    return k


def count_or_all(value):
    """'all' -> None, 'K' -> K >= 1 (principles per judged pair)."""
    return _count_or_all(value, "principles")


def pairs_or_all(value):
    """'all' -> None, 'N' -> N >= 1 (pairs a step runs on): a count, never 0 for "all"."""
    return _count_or_all(value, "pairs")
