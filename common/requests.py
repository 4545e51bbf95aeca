"""Typed, validated job requests: one frozen dataclass per job, shared by the Prefect flow, the CLI and the library.

A request is built from plain data (a flow's parameters, a JSON file, `--set a.b=v` strings) by `build` or
`merge`, nanoGPT-configurator style: strings are coerced to the field's declared type, nested dataclasses and
mappings are merged onto their defaults at every depth, and an unknown key is an error that lists the valid
names, so a typo never runs silently with a default. Ranges, choices and paths declared with `setting(...)` are
checked when the request is constructed. Every problem raises `RequestError` (a ValueError) whose one-line
message names the setting; the `lvd` CLI prints it without a traceback.

    @dataclass(frozen=True)
    class ThumbRequest(Request):
        source: str = setting(help="video file", path="file", positional=True)
        size: int = setting(64, help="long side in pixels", min=8)

    ThumbRequest.build({"source": "a.mp4", "size": "128"})   # size coerced to 128
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")
_MISSING = dataclasses.MISSING
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null"}


class RequestError(ValueError):
    """A bad value, path or setting in a job request; the message is one line that names the setting."""


class SettingError(RequestError):
    """A value its `setting(...)` refuses, or a failed `validate()`: `setting` names it relative to the dataclass
    that raised it, and `build` prefixes each enclosing field on the way up, so a nested section's message names
    the dotted setting (`setting clips.method must be one of ...`) without the section knowing where it sits."""

    def __init__(self, setting: str, problem: str) -> None:
        self.setting, self.problem = setting, problem
        nested = "." in setting or "[" in setting
        super().__init__(f"setting {setting} {problem}" if nested else f"{setting} {problem}")

    def within(self, parent: str) -> SettingError:
        """The same problem named from the dataclass (or list) one level up, whose field `parent` holds it."""
        return SettingError(f"{parent}{'' if self.setting.startswith('[') else '.'}{self.setting}", self.problem)


def setting(default: Any = _MISSING, *, help: str, default_factory: Any = _MISSING, min: float | None = None,
            max: float | None = None, choices: tuple[Any, ...] | None = None,
            path: Literal["file", "dir", "exists", "input", "output"] | None = None,
            flag: str | None = None,
            negate: str | None = None, positional: bool = False, repeat: bool = False, cli: bool = True) -> Any:
    """A request field with its documentation and checks.

    min / max: inclusive bounds (for numbers; for sequences, every element). choices: the values allowed (for
    sequences, every element must be one). path: the value (when not None
    and not a URL) must be an existing file, directory, or either; "input" (read by the job, checked where it
    is read: a folder or a cached hub id) and "output" (written by the job) are paths that are not checked for
    existence. Every path kind is confined to the allowed roots when they are set (`check_allowed_roots`).
    CLI only: flag renames the option
    (`--frames` for `num_frames`), negate gives a bool field defaulting to True a switch that sets it to
    False (`--restart` for `resume`), positional makes it a positional argument, repeat makes a list
    option repeatable (`--prompt a --prompt b`) instead of taking several values, cli=False hides it.
    """
    metadata = {"help": help, "min": min, "max": max, "choices": choices, "path": path, "flag": flag, "negate": negate,
                "positional": positional, "repeat": repeat, "cli": cli}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def type_hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a dataclass (annotations are strings under `from __future__ import annotations`)."""
    cached = cls.__dict__.get("__resolved_hints__")
    if cached is None:
        cached = typing.get_type_hints(cls)
        setattr(cls, "__resolved_hints__", cached)  # noqa: B010 - per-class cache, frozen instances unaffected
    return cached


def build(cls: type[T], overrides: Mapping[str, Any] | None = None, *, name: str = "") -> T:
    """`cls`'s defaults with `overrides` merged at every depth (`name` prefixes the settings in messages)."""
    return _build(cls, None, overrides or {}, name)


def merge(instance: T, overrides: Mapping[str, Any] | None, *, name: str = "") -> T:
    """A copy of the dataclass `instance` with `overrides` merged at every depth; the instance is unchanged."""
    return _build(type(instance), instance, overrides or {}, name)


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Plain nested dicts merged key by key: a mapping in `overrides` updates the mapping it lands on."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_set_options(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`["a.b=1", "a.c=x"]` -> `{"a": {"b": "1", "c": "x"}}`; values stay strings, typed later by `build`."""
    overrides: dict[str, Any] = {}
    for item in items:
        dotted, equals, raw = item.partition("=")
        if not equals or not dotted.strip():
            raise RequestError(f"--set expects KEY=VALUE, got {item!r}")
        *parents, leaf = dotted.strip().split(".")
        overrides = deep_merge(overrides, _nest(parents, {leaf: raw}))
    return overrides


def to_data(value: Any) -> Any:
    """A request (or anything in it) as JSON-ready data: dataclasses -> dicts, tuples -> lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {key: to_data(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [to_data(item) for item in value]
    return value


class Settings:
    """Base of frozen settings dataclasses (a request, a section nested in one): checked on construction.

    Subclasses are `@dataclass(frozen=True)` with fields declared by `setting(...)`, whose min / max / choices /
    path `check_fields` enforces; `validate()` adds the checks that involve several fields. A change is a new
    instance (`merge`, `dataclasses.replace`), so it is checked too.
    """

    def __post_init__(self) -> None:
        check_fields(self)
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; raise SettingError naming the field (`build` adds where the section sits)."""


class Request(Settings):
    """Base of the job requests: frozen `Settings` checked on construction.

    `validate()` adds the checks that involve several fields, `check_inputs()` those that read the disk.
    `build` / `with_overrides` / `to_dict` are the ways in and out.
    """

    def check_inputs(self) -> Any:
        """Checks that read the disk (inputs present, a previous step's output there); the CLI runs them
        before the job starts, flows in their first task. Raise RequestError or FileNotFoundError."""

    @classmethod
    def build(cls: type[T], overrides: Mapping[str, Any] | None = None, /, **fields: Any) -> T:
        """The defaults with `overrides` (and keyword `fields`) merged at every depth, typed and checked."""
        return build(cls, deep_merge(overrides or {}, fields))

    def with_overrides(self: T, overrides: Mapping[str, Any] | None = None, /, **fields: Any) -> T:
        return merge(self, deep_merge(overrides or {}, fields))

    def to_dict(self) -> dict[str, Any]:
        return to_data(self)


def check_fields(instance: Any) -> None:
    """The ranges, choices and paths declared with `setting(...)`: a SettingError naming the first bad field."""
    for f in dataclasses.fields(instance):
        value = getattr(instance, f.name)
        low, high, kind = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("path")
        choices = f.metadata.get("choices")
        if value is None:
            continue
        sequence = isinstance(value, list | tuple)
        items = value if sequence else (value,)
        if choices is not None:
            for item in items:
                if item not in choices:
                    within = f" in {value!r}" if sequence else ""
                    raise SettingError(f.name, f"must be one of {', '.join(map(str, choices))}, got {item!r}{within}")
        for item in items:
            if not isinstance(item, int | float) or isinstance(item, bool):
                continue
            if item != item and (low is not None or high is not None):  # NaN compares as inside every range
                raise SettingError(f.name, f"must be a number in range, got {value!r}")
            if low is not None and item < low:
                raise SettingError(f.name, f"must be >= {low}, got {value!r}")
            if high is not None and item > high:
                raise SettingError(f.name, f"must be <= {high}, got {value!r}")
        if kind is not None:
            for item in items:
                if not isinstance(item, str) or "://" in item:
                    continue
                path = Path(item).expanduser()
                if kind in ("input", "output"):
                    continue
                exists = {"file": path.is_file, "dir": path.is_dir, "exists": path.exists}[kind]()
                if not exists:
                    what = {"file": "file", "dir": "directory", "exists": "file or directory"}[kind]
                    raise RequestError(f"{f.name}: no such {what}: {item}")


ALLOWED_ROOTS_ENV = "LVD_ALLOWED_ROOTS"


def allowed_roots() -> list[Path] | None:
    """The folders a served job may read and write (LVD_ALLOWED_ROOTS, joined by os.pathsep; `lvd serve
    --allow-root`), resolved; None when unset (no confinement: a user's own CLI run)."""
    import os

    value = os.environ.get(ALLOWED_ROOTS_ENV, "").strip()
    if not value:
        return None
    return [Path(part).expanduser().resolve() for part in value.split(os.pathsep) if part.strip()]


def check_allowed_roots(request: Any, roots: list[Path] | None = None, prefix: str = "") -> None:
    """Raise a one-line RequestError when a path setting of `request` (any `setting(path=...)`, nested settings
    included) resolves outside `roots` (default: `allowed_roots()`; nothing is checked when there are none).
    Resolving follows symlinks and `..`, so neither leads out of a root; URLs (s3://, ...) are left alone."""
    roots = allowed_roots() if roots is None else roots
    if not roots:
        return
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        name = _join(prefix, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_allowed_roots(value, roots, name)
            continue
        if f.metadata.get("path") is None or value is None:
            continue
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, str):
                check_path_allowed(name, item, roots, optional=f.metadata["path"] == "input")


def check_path_allowed(name: str, item: str, roots: list[Path], optional: bool = False) -> None:
    """One path of setting `name` inside `roots` (URLs are left alone; with `optional`, a path that does not
    exist is too: a preset name or a cached hub id, found elsewhere); a one-line RequestError otherwise."""
    if "://" in item:
        return
    resolved = Path(item).expanduser().resolve()
    if optional and not resolved.exists():
        return
    if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(root) for root in roots)
        raise RequestError(f"{name}: {item} is outside the allowed roots ({allowed})")


# ------------------------------------------------------------------------------------------ internals


def _nest(parents: list[str], leaf: dict[str, Any]) -> dict[str, Any]:
    for part in reversed(parents):
        leaf = {part: leaf}
    return leaf


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type[T], base: Any, overrides: Any, path: str) -> T:
    if not isinstance(overrides, Mapping):
        raise RequestError(f"setting {path or cls.__name__} must be a mapping of settings, got {overrides!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in overrides:
        if key not in fields:
            raise RequestError(f"unknown setting {_join(path, str(key))}; known: {', '.join(sorted(fields))}")
    hints = type_hints(cls)
    values = {}
    for name, f in fields.items():
        if base is not None:
            current = getattr(base, name)
        elif f.default is not _MISSING:
            current = f.default
        elif f.default_factory is not _MISSING:
            current = f.default_factory()
        else:
            current = _MISSING
        if name in overrides:
            try:
                values[name] = coerce(overrides[name], hints[name], _join(path, name), current)
            except SettingError as error:  # a nested section refused a value: name it from here
                raise error.within(name) from None
        elif current is _MISSING:
            raise RequestError(f"missing setting {_join(path, name)}")
        else:
            values[name] = current
    try:
        return cls(**values)
    except RequestError:
        raise
    except ValueError as error:  # a dataclass's own __post_init__ check: keep its message, make it ours
        raise RequestError(str(error)) from error


def _describe(hint: Any) -> str:
    if isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def _from_json(value: str, hint: Any, name: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError as error:
        raise RequestError(f"setting {name} must be {_describe(hint)} (JSON), got {value!r}") from error


def coerce(value: Any, hint: Any, name: str, current: Any = _MISSING) -> Any:
    """`value` as type `hint` (strings parsed), nested dataclasses/mappings merged onto `current`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return coerce(value, options[0], name, current)
        for option in options:
            try:
                return coerce(value, option, name, current)
            except RequestError:
                continue
        raise RequestError(f"setting {name} must be {_describe(hint)}, got {value!r}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and value == str(choice)):
                return choice
        raise RequestError(f"setting {name} must be one of {', '.join(map(str, args))}, got {value!r}")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, str):
            value = _from_json(value, hint, name)
        base = current if dataclasses.is_dataclass(current) else None
        return _build(hint, base, value, name)
    if hint is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise RequestError(f"setting {name} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise RequestError(f"setting {name} must be int, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise RequestError(f"setting {name} must be float, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise RequestError(f"setting {name} must be str, got {value!r} ({type(value).__name__})")
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, str):
            text = value.strip()
            value = _from_json(text, hint, name) if text.startswith("[") else [p.strip() for p in text.split(",")]
        if not isinstance(value, list | tuple):
            raise RequestError(f"setting {name} must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            element_types = [args[0]] * len(value)
        elif origin is tuple and args:
            if len(args) != len(value):
                raise RequestError(f"setting {name} must have {len(args)} values, got {value!r}")
            element_types = list(args)
        else:
            element_types = [args[0] if args else Any] * len(value)
        items = []
        for index, (item, kind) in enumerate(zip(value, element_types, strict=True)):
            try:
                items.append(coerce(item, kind, f"{name}[{index}]"))
            except SettingError as error:
                raise error.within(f"[{index}]") from None
        return tuple(items) if (origin or hint) is tuple else items
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        if isinstance(value, str):
            value = _from_json(value, hint, name)
        if not isinstance(value, Mapping):
            raise RequestError(f"setting {name} must be a mapping, got {value!r}")
        value_type = args[1] if len(args) == 2 else Any
        merged = deep_merge(current, value) if isinstance(current, Mapping) else dict(value)
        coerced = {}
        for key, item in merged.items():
            try:
                coerced[key] = coerce(item, value_type, _join(name, str(key)))
            except SettingError as error:
                raise error.within(str(key)) from None
        return coerced
    if isinstance(hint, type) and isinstance(value, hint):
        return value
    raise RequestError(f"setting {name} must be {_describe(hint)}, got {value!r}")


# ------------------------------------------------------------------------------- flat parameters


def flat_parameters(request_type: type[Any]) -> Any:
    """Decorator: `fn(request)` becomes `fn(**fields)` with the request's fields as its signature.

    For Prefect flows: the UI form, `--param name=value` and the deployment's parameter schema see the
    request's fields (nested settings as a dict of overrides), their defaults and their help text, while
    the fields are written once, in the request. Calling the decorated function builds the request (typed,
    merged onto the defaults, checked) and passes it on.
    """
    import functools
    import inspect

    hints = type_hints(request_type)
    parameters, docs = [], []
    for f in dataclasses.fields(request_type):
        if not f.init:
            continue
        hint, default = hints[f.name], f.default
        if f.default_factory is not _MISSING:
            default = None
        if _is_tree(hint):
            hint, default = dict[str, Any] | None, None  # overrides of the nested settings
        elif typing.get_origin(hint) is tuple:
            hint = list[typing.get_args(hint)[0]] | None if typing.get_args(hint) else list | None
            default = None if default is _MISSING or default is None else list(default)
        empty = inspect.Parameter.empty
        parameters.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hint,
                                            default=empty if default is _MISSING else default))
        docs.append(f"    {f.name}: {f.metadata.get('help', '')}")
    signature = inspect.Signature(parameters)

    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            # None for a field that cannot be None (a settings tree, a list) means "the default"
            given = {name: value for name, value in bound.arguments.items()
                     if not (value is None and not _admits_none(hints[name]))}
            request = build(request_type, given)
            check_allowed_roots(request)  # a served deployment's paths stay inside the roots it was given
            return fn(request)

        wrapper.__signature__ = signature
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        wrapper.__doc__ = (inspect.getdoc(fn) or "").rstrip() + "\n\nArgs:\n" + "\n".join(docs) + "\n"
        del wrapper.__wrapped__  # inspect.signature must stop at the flat signature
        return wrapper

    return decorate


def _admits_none(hint: Any) -> bool:
    return hint is Any or type(None) in typing.get_args(hint)


def _is_tree(hint: Any) -> bool:
    union = typing.get_origin(hint) in (Union, types.UnionType)
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)] if union else [hint]
    return any(dataclasses.is_dataclass(arg) or typing.get_origin(arg) is dict or arg is dict for arg in options)
