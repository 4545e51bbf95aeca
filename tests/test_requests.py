"""Typed job requests and the `lvd` CLI generated from them: coercion, deep merge, one-line errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.requests import RequestError, parse_set_options
from curation.config import CurateRequest, CurationConfig
from evaluation.generated import FvdRequest
from flows.cli import build_parser, main, request_from_args
from generation.generate import GenerateRequest
from generation.render import WalkRequest
from training.request import StageRunRequest

ROOT = Path(__file__).resolve().parents[1]


def _request(argv: list[str], settings: str):
    """The request a command line builds (without the disk checks that `lvd` runs next)."""
    args = build_parser().parse_args(argv)
    return request_from_args({"curate": CurateRequest, "train": StageRunRequest}[argv[0]], args, settings)


def test_the_command_table_matches_what_each_module_registers():
    """`lvd --help` lists COMMANDS without importing their modules: the table must be what they register."""
    import argparse
    import importlib

    from flows.cli import COMMANDS

    for module_name in dict.fromkeys(module for module, _ in COMMANDS.values()):
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module_name).register(subparsers)
        registered = {action.dest: action.help for action in subparsers._choices_actions}
        assert registered == {name: help_line for name, (module, help_line) in COMMANDS.items()
                              if module == module_name}, module_name


def test_lvd_help_imports_no_command_module():
    code = ("import sys\nfrom flows.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'prefect', 'ray') if m in sys.modules))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "curate" in run.stdout and "evaluate-fvd" in run.stdout, run.stdout + run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[]", run.stdout


def test_strings_are_typed_and_nested_settings_merge_onto_the_defaults():
    config = CurationConfig.from_overrides(parse_set_options(
        ["clips.min_clip_s=2", "clips.stream_copy=false", "scorers.clip.pool.batch_size=4",
         "cuts.dissolve_lengths=8,12", "scorers.text.frames_per_forward=null"]))
    assert config.clips.min_clip_s == 2.0 and config.clips.stream_copy is False
    assert config.clips.max_clip_s == ClipDefaults.max_clip_s  # the sibling keeps its default
    assert config.scorers.clip.pool.batch_size == 4 and config.scorers.clip.pool.actors_per_gpu == 2
    assert config.cuts.dissolve_lengths == (8, 12) and config.scorers.text.frames_per_forward is None
    rules = CurationConfig.from_overrides({"filters": [{"name": "x", "column": "motion_score", "mode": "absolute",
                                                        "drop": "low", "value": "0.5"}]}).filters
    assert rules[0].value == 0.5 and len(rules) == 1


class ClipDefaults:
    max_clip_s = CurationConfig().clips.max_clip_s


def test_unknown_and_mistyped_settings_are_named_with_the_valid_names():
    with pytest.raises(RequestError, match=r"unknown setting config\.scorers\.clip\.pretraind; known: .*pretrained"):
        CurationConfig.from_overrides({"scorers": {"clip": {"pretraind": "x"}}})
    with pytest.raises(RequestError, match=r"setting config\.clips\.min_clip_s must be float, got 'two'"):
        CurationConfig.from_overrides({"clips": {"min_clip_s": "two"}})
    with pytest.raises(RequestError, match="setting strategy must be one of ddp, fsdp, got 'fdsp'"):
        StageRunRequest.build(stage=1, data=str(ROOT), strategy="fdsp")
    with pytest.raises(RequestError, match="max_steps must be >= 1, got -2"):
        StageRunRequest.build(stage=1, data=str(ROOT), max_steps=-2)
    with pytest.raises(RequestError, match="missing setting stage"):
        StageRunRequest.build(data=str(ROOT))


def test_requests_are_frozen_and_round_trip_through_plain_data(tmp_path):
    request = CurateRequest.build({"input_path": str(tmp_path), "config": {"clips": {"min_clip_s": 3}}})
    with pytest.raises(AttributeError):
        request.output_path = "elsewhere"  # type: ignore[misc]
    again = CurateRequest.build(json.loads(json.dumps(request.to_dict())))
    assert again == request and again.config.clips.min_clip_s == 3.0
    moved = request.with_overrides(config={"clips": {"max_clip_s": 9}})
    assert moved.config.clips.min_clip_s == 3.0 and moved.config.clips.max_clip_s == 9.0
    assert request.config.clips.max_clip_s == ClipDefaults.max_clip_s  # the original is unchanged


@pytest.mark.parametrize("module, name", [("flows.curate", "curate_lvd"), ("flows.train", "train_stage"),
                                          ("flows.pipeline", "lvd_pipeline"), ("flows.walk", "generate_walk"),
                                          ("flows.evaluate", "evaluate_fvd"),
                                          ("flows.generate", "generate_video")])
def test_flows_take_the_request_fields_and_accept_their_own_defaults(module, name):
    """A served deployment passes every parameter, defaults included; Prefect must accept each of them."""
    import importlib
    import inspect

    flow = getattr(importlib.import_module(module), name)
    request_type = {"curate_lvd": CurateRequest, "train_stage": StageRunRequest, "generate_walk": WalkRequest,
                    "evaluate_fvd": FvdRequest, "generate_video": GenerateRequest}.get(name)
    if request_type is None:
        from flows.pipeline import PipelineRequest as request_type
    fields = [f.name for f in dataclasses.fields(request_type)]
    assert list(flow.parameters.properties) == fields
    defaults = {key: p.default for key, p in inspect.signature(flow.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    required = {"train_stage": {"stage": 1}, "evaluate_fvd": {"real_dir": str(ROOT)}}.get(name, {})
    assert flow.validate_parameters({**defaults, **required})


def test_config_file_and_set_merge_at_every_depth(tmp_path):
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"w")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"scorers": {"clip": {"pretrained": str(weights), "frames_per_forward": 12,
                                                         "pool": {"batch_size": 3}}},
                                    "clips": {"min_clip_s": 2.5}}))
    request = _request(["curate", str(tmp_path), str(tmp_path / "out"), "--config", str(settings),
                        "--set", "scorers.clip.frames_per_forward=6", "--set", "scorers.clip.pool.num_cpus=2",
                        "--set", "clips.max_clip_s=20"], "config")
    clip = request.config.scorers.clip
    assert clip.pretrained == str(weights) and clip.frames_per_forward == 6  # --set wins over the file
    assert clip.pool.batch_size == 3 and clip.pool.num_cpus == 2.0  # file and --set siblings both survive
    assert request.config.clips.min_clip_s == 2.5 and request.config.clips.max_clip_s == 20.0
    assert request.input_path == str(tmp_path) and request.output_path == str(tmp_path / "out")

    settings.write_text(json.dumps({"stage": 2, "seed": 3, "max_steps": 5, "data": str(tmp_path)}))
    request = _request(["train", "--config", str(settings), "--seed", "4", "--set", "max_steps=7", "--restart"], "")
    assert (request.stage, request.seed, request.max_steps, request.resume) == (2, 4, 7, False)

    settings.write_text(json.dumps({"clips": {"min_clipz": 1}}))
    unknown = r"unknown setting config.clips.min_clipz; known: (\w+, )*max_clip_s, min_clip_s"
    with pytest.raises(RequestError, match=unknown):
        _request(["curate", str(tmp_path), "--config", str(settings)], "config")


BAD_COMMAND_LINES = {
    # (argv, what the one line must say); the first of each command runs as a subprocess, as the user runs it
    "missing input": (["curate", "{tmp}/missing"], "input_path: no such file or directory"),
    "typo": (["curate", "{tmp}", "--set", "clips.min_clp_s=2"], "unknown setting config.clips.min_clp_s; known:"),
    "not a number": (["curate", "{tmp}", "--set", "motion.fps=fast"], "config.motion.fps must be float, got 'fast'"),
    "negative": (["train", "--stage", "1", "--data", "{tmp}", "--max-steps", "-3"], "max_steps must be >= 1, got -3"),
    "not an int": (["train", "--stage", "one"], "setting stage must be int, got 'one'"),
    "no shards": (["train", "--stage", "1", "--data", "{tmp}"], "no WebDataset shards"),
    "unknown option": (["train", "--stage", "1", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    "bad config file": (["curate", "--config", "{tmp}/none.json"], "--config: no such file"),
    "negative frames": (["generate", "a cat", "--frames", "-3", "--out", "{tmp}/x.mp4"], "num_frames must be >= 1"),
    "missing image": (["generate", "--image", "{tmp}/none.png", "--out", "{tmp}/x.mp4"], "none.png: no such file"),
    "frames not a number": (["generate", "a cat", "--frames", "many"], "setting num_frames must be int, got 'many'"),
    "seed out of range": (["generate", "a cat", "--seed", "100000000000000000000000", "--out", "{tmp}/x.mp4"],
                          "seed must be <= 9223372036854775807"),
    "seed not an int": (["generate", "a cat", "--seed", "1e23", "--out", "{tmp}/x.mp4"], "seed must be int"),
    "negative seed": (["generate", "a cat", "--seed", "-1", "--out", "{tmp}/x.mp4"], "seed must be >= 0"),
    "output not writable": (["generate", "a cat", "--out", "/proc/self/x.mp4"], "cannot write in /proc/self"),
    "walk bad envelope": (["walk", "--prompts", "a", "b", "--audio-envelope", "loud"],
                          "setting audio_envelope must be one of onset, rms, got 'loud'"),
    "fvd too few frames": (["fvd", "{tmp}", "{tmp}", "--frames", "4"], "num_frames must be >= 9 for I3D, got 4"),
    "evaluate missing real": (["evaluate-fvd", "{tmp}/missing"], "real_dir: no such directory"),
    "evaluate one video": (["evaluate-fvd", "{tmp}", "--num-videos", "1"], "num_videos must be >= 2"),
    "walk negative frames": (["walk", "--prompts", "a", "b", "--frames", "-4"], "frames must be >= 1, got (-4,)"),
}
SUBPROCESS_CASES = ("missing input", "negative", "negative frames", "walk negative frames", "evaluate one video")


def _argv(case: str, tmp_path: Path) -> list[str]:
    return [word.replace("{tmp}", str(tmp_path)) for word in BAD_COMMAND_LINES[case][0]]


def _assert_one_line(case: str, returncode: int, stderr: str) -> None:
    command, expected = BAD_COMMAND_LINES[case][0][0], BAD_COMMAND_LINES[case][1]
    lines = stderr.strip().splitlines()
    assert returncode == 2 and len(lines) == 1, (case, returncode, stderr[-2000:])
    assert lines[0].startswith(f"lvd {command}: error: ") and expected in lines[0], (case, lines[0])


def test_bad_arguments_end_in_one_line_and_exit_code_2(tmp_path):
    """Run as the user does (one command line each of lvd curate, train, generate): a bad command line prints
    one line naming the problem, no traceback."""
    running = {case: subprocess.Popen([sys.executable, "-m", "flows.cli", *_argv(case, tmp_path)], cwd=ROOT,
                                      text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for case in SUBPROCESS_CASES}
    for case, process in running.items():
        _, stderr = process.communicate(timeout=300)
        _assert_one_line(case, process.returncode, stderr)


@pytest.mark.parametrize("case", sorted(set(BAD_COMMAND_LINES) - set(SUBPROCESS_CASES)))
def test_every_bad_argument_is_one_line_from_the_one_handler(case, tmp_path, capsys):
    returncode = main(_argv(case, tmp_path))
    _assert_one_line(case, returncode, capsys.readouterr().err)
