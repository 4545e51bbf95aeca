"""One validation mechanism for curation settings (issue 28): every section of CurationConfig and every scorer's
settings is a frozen dataclass of `setting(...)` fields whose min / max / choices `check_fields` enforces, with
cross-field checks in `validate()`, and a bad value given anywhere in the tree is one line naming the dotted
setting."""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from pathlib import Path

import pytest

import common.requests
from common.requests import RequestError, Settings, build, merge, parse_set_options, setting, type_hints
from curation.config import CLIP_METHODS, CurateRequest, CurationConfig, FilterRule
from curation.scorers import SCORER_NAMES
from curation.scorers.config import ScorersConfig, TextAreaConfig
from curation.scorers.graph import SCORERS, spec_of
from flows.cli import build_parser, request_from_args

ROOT = Path(__file__).resolve().parents[1]


def _section_types(cls: type, found: dict[type, str] | None = None, where: str = "") -> dict[type, str]:
    """Every dataclass reachable from `cls` through its field types (lists and optionals included) -> a dotted
    place it sits at, found by walking the types, so a section added later is covered too."""
    found = {} if found is None else found
    if cls in found:
        return found
    found[cls] = where
    for name, hint in type_hints(cls).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        options = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        for option in options:
            inner = typing.get_args(option) if typing.get_origin(option) in (list, tuple) else (option,)
            for kind in inner:
                if dataclasses.is_dataclass(kind):
                    _section_types(kind, found, f"{where}.{name}" if where else name)
    return found


SECTIONS = {**_section_types(CurationConfig), **{spec.settings: f"scorers.{spec.name}" for spec in SCORERS.values()}}


def test_the_walk_finds_every_section_and_scorer_settings_class():
    names = {cls.__name__ for cls in SECTIONS}
    assert {"CurationConfig", "DecodeConfig", "CutConfig", "ClipConfig", "MotionConfig", "FilterRule", "ShardConfig",
            "DedupConfig", "ScorersConfig", "ActorPoolConfig", "TextAreaConfig", "ClipScoreConfig", "CaptionConfig",
            "VideoCaptionConfig", "LlmSummaryConfig", "RaftConfig"} <= names
    assert {spec.settings for spec in SCORERS.values()} <= set(SECTIONS)


@pytest.mark.parametrize("cls", sorted(SECTIONS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_field_is_a_setting_with_help_and_the_section_is_frozen(cls):
    assert issubclass(cls, Settings), f"{cls.__name__} is not checked by Settings.__post_init__"
    assert cls.__dataclass_params__.frozen, f"{cls.__name__} is not frozen"
    for f in dataclasses.fields(cls):
        assert "help" in f.metadata, f"{cls.__name__}.{f.name} is not a setting(...)"
        assert len(f.metadata["help"].strip()) > 8, f"{cls.__name__}.{f.name} has no help text"


def _instances(value: object, where: str = "config"):
    """(dotted place, instance) of every section under a built config."""
    if dataclasses.is_dataclass(value):
        yield where, value
        for f in dataclasses.fields(value):
            yield from _instances(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _instances(item, f"{where}[{index}]")


def test_assignment_to_any_section_of_a_built_config_raises():
    config = CurationConfig()
    seen = 0
    for _, section in _instances(config):
        name = dataclasses.fields(section)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, getattr(section, name))
        seen += 1
    assert seen >= 20  # root, 8 sections, 5 filter rules, 6 scorers with a pool each


def test_a_change_is_a_new_checked_instance_and_the_original_is_unchanged():
    config = CurationConfig()
    changed = merge(config, {"clips": {"method": "reencode"}, "scorers": {"raft": {"pool": {"batch_size": 2}}}})
    assert (changed.clips.method, changed.scorers.raft.pool.batch_size) == ("reencode", 2)
    assert (config.clips.method, config.scorers.raft.pool.batch_size) == ("exact-copy", 4)
    assert changed.cuts is config.cuts  # untouched sections are shared, they cannot change
    with pytest.raises(RequestError, match=r"^method must be one of exact-copy, keyframe, reencode, got 'copy'$"):
        dataclasses.replace(config.clips, method="copy")


# (--set items as the CLI takes them, the one line CurationConfig.from_overrides raises)
BAD_SETTINGS = [
    (["clips.method=x"], "setting clips.method must be one of exact-copy, keyframe, reencode, got 'x'"),
    (["clips.reencode_preset=fastest"], "setting clips.reencode_preset must be one of ultrafast, superfast, veryfast, "
                                         "faster, fast, medium, slow, slower, veryslow, got 'fastest'"),
    (["decode.min_side=0"], "setting decode.min_side must be >= 1, got 0"),
    (["cuts.fade_threshold=256"], "setting cuts.fade_threshold must be <= 255, got 256"),
    (["cuts.dissolve_lengths=8,1"], "setting cuts.dissolve_lengths must be >= 2, got (8, 1)"),
    (["motion.pyr_scale=0.99"], "setting motion.pyr_scale must be <= 0.95, got 0.99"),  # inherited from common/
    (["motion.fps=nan"], "setting motion.fps must be a number in range, got nan"),
    (["dedup.method=minhash"], "setting dedup.method must be one of auto, clip, phash, got 'minhash'"),
    (["dedup.keep_best=aesthetic_score,sharpness"], "setting dedup.keep_best must be one of motion_score, text_area, "
     "aesthetic_score, clip_score, raft_motion, pixels, length, got 'sharpness' in ('aesthetic_score', 'sharpness')"),
    (["scorers.text.backend=tesseract"], "setting scorers.text.backend must be one of auto, ppocr, craft, "
                                         "got 'tesseract'"),
    (["scorers.text.det_long_side=100"], "setting scorers.text.det_long_side must be a multiple of 32, got 100"),
    (["scorers.caption.decoding=sampling"], "setting scorers.caption.decoding must be one of beam_search, greedy, "
                                            "got 'sampling'"),
    (["scorers.raft.architecture=raft_huge"], "setting scorers.raft.architecture must be one of raft_large, "
                                              "raft_small, got 'raft_huge'"),
    (["scorers.raft.hq_max_text_area=2"], "setting scorers.raft.hq_max_text_area must be <= 1, got 2.0"),
    (["scorers.caption.pool.batch_size=0"], "setting scorers.caption.pool.batch_size must be >= 1, got 0"),
    (["scorers.clip.pool.num_gpus=-1"], "setting scorers.clip.pool.num_gpus must be >= 0, got -1.0"),
    # cross-field checks, in validate(), named the same way
    (["clips.min_clip_s=3", "clips.max_clip_s=2"], "setting clips.max_clip_s must be >= 3, got 2.0"),
    (["scorers.caption.min_tokens=10", "scorers.caption.max_tokens=10"],
     "setting scorers.caption.max_tokens must be > min_tokens (10), got 10"),
    (["scorers.llm_summary.prompt=Summarise {coca}."],
     "setting scorers.llm_summary.prompt must contain the placeholders {coca} and {video}"),
    (["scorers.raft.hq_drop_low_motion_percent=100"],
     "setting scorers.raft.hq_drop_low_motion_percent must be < 100 (dropping every clip leaves no hq subset), "
     "got 100"),
]


@pytest.mark.parametrize(("items", "message"), BAD_SETTINGS, ids=[items[-1] for items, _ in BAD_SETTINGS])
def test_bad_values_at_every_depth_are_one_line_naming_the_dotted_setting(items, message):
    with pytest.raises(RequestError) as error:
        CurationConfig.from_overrides(parse_set_options(items))
    assert str(error.value) == message
    # the request of a run names it from the request: the `config` field it sits in comes first
    with pytest.raises(RequestError) as error:
        CurateRequest.build({"config": parse_set_options(items)})
    assert str(error.value) == message.replace("setting ", "setting config.", 1)


def test_lvd_curate_set_gives_the_same_line(tmp_path):
    """What `lvd curate DIR --set scorers.text.pool.actors_per_gpu=0` builds, through the CLI's own parser."""
    args = build_parser().parse_args(["curate", str(tmp_path), "--set", "scorers.text.pool.actors_per_gpu=0"])
    with pytest.raises(RequestError) as error:
        request_from_args(CurateRequest, args, "config")
    assert str(error.value) == "setting config.scorers.text.pool.actors_per_gpu must be >= 1, got 0"


def test_a_bad_filter_rule_is_named_by_its_index_in_the_list():
    rule = {"name": "static", "column": "motion_score", "mode": "median", "drop": "low", "value": 25}
    with pytest.raises(RequestError) as error:
        CurationConfig.from_overrides({"filters": [rule]})
    assert str(error.value) == "setting filters[0].mode must be one of percentile, absolute, got 'median'"
    with pytest.raises(RequestError) as error:
        CurationConfig.from_overrides({"filters": [{**rule, "mode": "percentile", "drop": "middle"}]})
    assert str(error.value) == "setting filters[0].drop must be one of low, high, got 'middle'"
    percentile = r"^setting filters\[1\]\.value of filter rule 'x': a percentile must be in \[0, 100\], got 101"
    with pytest.raises(RequestError, match=percentile):
        CurationConfig.from_overrides({"filters": [{**rule, "mode": "absolute"}, {**rule, "name": "x",
                                                                                  "mode": "percentile", "value": 101}]})
    assert FilterRule("x", "motion_score", "absolute", "low", -3.0).value == -3.0  # absolute values are unbounded


def test_choices_on_any_settings_dataclass():
    """`setting(choices=...)`: the value, or each element of a sequence, is one of them; None is left alone."""

    @dataclasses.dataclass(frozen=True)
    class Thumbs(Settings):
        codec: str | None = setting("png", choices=("png", "jpeg"), help="image format of the thumbnails")
        sizes: tuple[int, ...] = setting((64,), choices=(32, 64, 128), help="long sides written")

    assert Thumbs(codec=None, sizes=(32, 128)).sizes == (32, 128)
    with pytest.raises(RequestError, match=r"^codec must be one of png, jpeg, got 'gif'$"):
        Thumbs(codec="gif")
    with pytest.raises(RequestError, match=r"^sizes must be one of 32, 64, 128, got 100 in \(64, 100\)$"):
        build(Thumbs, {"sizes": "64,100"})  # a top-level name reads as before: no dots, no "setting" prefix


def test_the_clip_method_choices_are_the_constant_the_chain_uses():
    assert dataclasses.fields(CurationConfig().clips)[2].metadata["choices"] == CLIP_METHODS


def test_check_ranges_is_gone():
    assert not hasattr(common.requests, "check_ranges")
    users = [str(path.relative_to(ROOT)) for folder in ("common", "curation", "flows", "training", "evaluation",
                                                         "generation", "dataformat", "model", "infra", "benchmarks")
             if (ROOT / folder).is_dir() for path in (ROOT / folder).rglob("*.py")
             if "check_ranges" in path.read_text(encoding="utf-8")]
    assert users == []


def test_actors_name_no_scorer_and_gpu_use_comes_from_the_table():
    """Whether a pool may take a GPU share is the scorer's own `can_use_gpu` hook in its ScorerSpec."""
    tree = ast.parse((ROOT / "curation" / "actors.py").read_text(encoding="utf-8"))
    literals = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert not literals & set(SCORER_NAMES)
    assert spec_of("text").gpu_usable(TextAreaConfig(backend="craft"))  # CRAFT is torch
    import onnxruntime

    cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert spec_of("text").gpu_usable(TextAreaConfig(backend="ppocr")) == cuda
    assert all(spec.gpu_usable(spec.settings()) for spec in SCORERS.values() if spec.name != "text")
    from curation.actors import plan_placement

    placed = plan_placement(["text"], build(ScorersConfig, {"text": {"backend": "ppocr"}}), {"GPU": 1.0, "CPU": 8.0})
    assert placed["text"].num_gpus == (0.25 if cuda else 0.0)
