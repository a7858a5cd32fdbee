"""What every ``thinkahead`` command shares: the input-error handler and the option aliases.

An option that several commands take is spelled once here (``CatalogDir``, ``ModelDir``, ...),
so its flag and help read the same everywhere. A flag that fills in a field of a settings model
(``TrainConfig``, ``ThinkAheadJob``, the service's ``Settings``) takes its default and help from
that field (:func:`default_of`, :func:`help_of`) instead of repeating them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from offline.errors import InputError
from service.contracts.catalog import CatalogError
from service.contracts.manifest import ManifestError

# ValidationError: a setting out of range (a config built from the options)
USER_ERRORS: tuple[type[Exception], ...] = (
    InputError,
    CatalogError,
    ManifestError,
    ValidationError,
)
INPUT_ERROR_EXIT = 2

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turn the project's input errors into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            typer.echo(f"error: {_one_line(exc)}", err=True)
            raise typer.Exit(INPUT_ERROR_EXIT) from None

    return wrapper  # type: ignore[return-value]


def _one_line(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']}" for e in exc.errors()
        )
    return str(exc)


def default_of(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].default


def help_of(model: type[BaseModel], name: str) -> str | None:
    return model.model_fields[name].description


def options_of(model: type[BaseModel]) -> Callable[..., typer.models.OptionInfo]:
    """``option(name, help=None)``: a typer option worded as ``model``'s field ``name`` is
    described (one wording for the setting, its job and its flag), unless ``help`` says
    otherwise."""

    def option(name: str, help: str | None = None) -> typer.models.OptionInfo:
        return typer.Option(help=help or help_of(model, name))

    return option


CatalogDir = Annotated[Path, typer.Option("--catalog", help="catalog directory")]
ModelDir = Annotated[Path, typer.Option("--model", help="model directory")]
Interactions = Annotated[
    Path, typer.Option("--interactions", help="interactions CSV (user_id, item_id[, timestamp])")
]
RedisUrl = Annotated[str, typer.Option("--redis", help="redis URL")]
Progress = Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars")]
ItemModelDir = Annotated[
    Path | None,
    typer.Option(help="item-level model directory (default: the model's items/ if any)"),
]
EngineChoice = Annotated[
    str,
    typer.Option(help="vllm, or torch (plain PyTorch: the same requests, minutes on a CPU)"),
]
HoldoutLast = Annotated[
    int,
    typer.Option(
        help="ignore each user's last N interactions (benchmarks: 2, so validation and test "
        "targets are not counted; production: 0)"
    ),
]
Refit = Annotated[
    bool,
    typer.Option(
        help="train on train + validation for exactly --epochs (the serving model; use the best "
        "epoch of a selection run; its figures are not comparable with the papers')"
    ),
]
