"""Command-line options built from the flow parameter models, so every default is written once.

:func:`options_command` turns a pydantic parameter model (whose fields may be frozen dataclasses, as
``RecalibrateParams.sampling``) into a Typer command: one ``--option`` per leaf field, named after it
(nested fields are flattened, so leaf names must be unique), help text from the field's description
with the model's default shown. Options left out are not passed, so the model's own defaults apply; what
is given goes through the model's validation (one place for bounds and cross-field rules). ``none``
sets an optional field to None; list fields repeat their option (numbers also take "1,10,100").
An optional nested model (``CanaryParams.live``) is built when any of its options is given.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import os
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console

err_console = Console(stderr=True)


@dataclass(frozen=True)
class _Leaf:
    path: tuple[str, ...]  # field names from the model down to the leaf
    annotation: Any
    default: Any
    description: str


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without Annotated / Optional, whether None is allowed)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        inner, _ = _unwrap(rest[0]) if len(rest) == 1 else (annotation, True)
        return inner, True
    return annotation, False


def _is_nested(annotation: Any) -> bool:
    inner, _ = _unwrap(annotation)
    return isinstance(inner, type) and (
        dataclasses.is_dataclass(inner) or issubclass(inner, BaseModel)
    )


def _leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[_Leaf]:
    leaves: list[_Leaf] = []
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        for name, info in cls.model_fields.items():
            annotation = info.annotation
            default = info.get_default(call_default_factory=True)
            if _is_nested(annotation):
                leaves.extend(_leaves(_unwrap(annotation)[0], (*prefix, name)))
            else:
                leaves.append(_Leaf((*prefix, name), annotation, default, info.description or ""))
        return leaves
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if _is_nested(hints[f.name]):
            leaves.extend(_leaves(_unwrap(hints[f.name])[0], (*prefix, f.name)))
        else:
            description = f.metadata.get("description", "")
            leaves.append(_Leaf((*prefix, f.name), hints[f.name], default, description))
    return leaves


def _shown(value: Any) -> str:
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, (tuple, list)):
        return ", ".join(_shown(v) for v in value) or "none"
    return "none" if value is None else str(value)


def _option(leaf: _Leaf, flags: Sequence[str]) -> tuple[Any, Any]:
    """(annotation for Typer, typer.Option) of one leaf."""
    inner, optional = _unwrap(leaf.annotation)
    name = leaf.path[-1].replace("_", "-")
    help_text = leaf.description
    if inner is bool:
        decls = list(flags) or [f"--{name}/--no-{name}"]
        return bool | None, typer.Option(
            *decls, help=f"{help_text} (default: {_shown(leaf.default)})", show_default=False
        )
    origin = typing.get_origin(inner)
    decls = list(flags) or [f"--{name}"]
    extra = ""
    if origin in (tuple, list):
        extra = " Repeat the option for several values."
    elif optional:
        extra = " 'none' unsets it."
    elif inner is dt.datetime:
        extra = " ISO 8601."
    help_full = f"{help_text}{extra} (default: {_shown(leaf.default)})"
    metavar = _metavar(typing.get_args(inner)[0] if origin in (tuple, list) else inner)
    if origin in (tuple, list):
        return list[str] | None, typer.Option(
            *decls, help=help_full, show_default=False, metavar=metavar
        )
    return str | None, typer.Option(*decls, help=help_full, show_default=False, metavar=metavar)


def _metavar(inner: Any) -> str:
    if isinstance(inner, type) and issubclass(inner, Enum):
        return "|".join(str(m.value) for m in inner)
    return {int: "INT", float: "FLOAT", dt.datetime: "ISO-8601"}.get(inner, "TEXT")


def _value(leaf: _Leaf, raw: Any) -> Any:
    inner, optional = _unwrap(leaf.annotation)
    if optional and isinstance(raw, str) and raw.strip().lower() == "none":
        return None
    if isinstance(raw, list) and len(raw) == 1 and optional and raw[0].strip().lower() == "none":
        return None
    item = typing.get_args(inner)[0] if typing.get_origin(inner) in (tuple, list) else None
    if isinstance(raw, list) and item in (int, float):  # numbers: "1,10,100" or repeated
        return [part.strip() for value in raw for part in value.split(",") if part.strip()]
    return raw


def credentials_to_environment(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` without a ``db_url`` / ``tracking_uri`` that carries credentials: such a URL is
    put in this process's environment (``FP4ROLL_DB_URL`` / ``MLFLOW_TRACKING_URI``), where the
    flows read their defaults, instead of a flow parameter Prefect would persist and show."""
    from pipelines.params import CREDENTIAL_ENV
    from registry.url_redaction import has_credentials

    kept = dict(values)
    for field, env in CREDENTIAL_ENV.items():
        value = kept.get(field)
        if isinstance(value, str) and has_credentials(value):
            os.environ[env] = value
            kept.pop(field)
    return kept


def build_params(model: type[BaseModel], values: Mapping[tuple[str, ...], Any]) -> BaseModel:
    """Validate ``values`` (leaf path -> raw CLI value) into ``model``; clean exit 2 on errors.
    Credential-bearing URLs go to the environment (:func:`credentials_to_environment`)."""
    top = credentials_to_environment({p[0]: v for p, v in values.items() if len(p) == 1})
    values = {p: v for p, v in values.items() if len(p) > 1 or p[0] in top}
    nested: dict[str, Any] = {}
    for path, raw in values.items():
        node = nested
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = raw
    try:
        return model(**nested)
    except ValidationError as exc:
        err_console.print(f"[red]invalid parameters:[/red]\n{exc}")
        raise typer.Exit(2) from None


def options_command(
    model: type[BaseModel],
    run: Callable[[BaseModel], Any],
    *,
    flags: Mapping[str, Sequence[str]] | None = None,
    exclude: Sequence[str] = (),
    extra: Mapping[str, tuple[Any, Any, Any]] | None = None,
    doc: str | None = None,
) -> Callable[..., Any]:
    """A Typer command whose options are ``model``'s fields; it validates them and calls ``run``.

    ``flags`` renames a leaf's option (e.g. ``{"model_name": ("--model", "-m")}``); ``exclude`` leaves
    fields (or whole nested models) out of the command line (their defaults, or the environment,
    apply); ``extra`` adds options
    that are not parameters (name -> (annotation, default, typer.Option without a default)), passed
    to ``run`` as keywords.
    """
    flags = dict(flags or {})
    leaves = [leaf for leaf in _leaves(model) if not set(leaf.path) & set(exclude)]
    names = [leaf.path[-1] for leaf in leaves]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{model.__name__}: leaf field names are not unique: {duplicates}")
    parameters = []
    annotations: dict[str, Any] = {}
    for leaf in leaves:
        annotation, option = _option(leaf, flags.get(leaf.path[-1], ()))
        key = leaf.path[-1]
        annotations[key] = Annotated[annotation, option]
        parameters.append(
            inspect.Parameter(
                key, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotations[key]
            )
        )
    for name, (annotation, default, option) in (extra or {}).items():
        annotations[name] = Annotated[annotation, option]
        parameters.append(
            inspect.Parameter(
                name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotations[name]
            )
        )
    by_name = {leaf.path[-1]: leaf for leaf in leaves}

    def command(**kwargs: Any) -> Any:
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k not in by_name}
        values = {
            by_name[k].path: _value(by_name[k], v)
            for k, v in kwargs.items()
            if v is not None and not (isinstance(v, list) and not v)
        }
        return run(build_params(model, values), **extras)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = doc or model.__doc__
    return command
