"""The requests of a preference study: create it, serve it, read its results, and the flow that does all three.

Every field has a default so the requests compose by inheritance: the `evaluate-preference` flow's request is
a create, a serve and a results request at once, and each library entry point takes it as the one it needs.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.requests import Request, RequestError, allowed_roots, check_path_allowed, setting
from dataformat import VIDEO_SUFFIXES
from dataformat.preference import GOLD_DIR, StudyLayout

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
DEFAULT_AXES = ("quality", "motion", "prompt")
LOOPBACK_NAMES = ("localhost",)


def check_name(kind: str, name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise RequestError(f"{kind} {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter "
                           "or digit")
    return name


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class StudyRequest(Request):
    """What every study command names: the study folder."""

    output_dir: str = setting("out/study", positional=True, path="output", help="the study folder")

    @property
    def layout(self) -> StudyLayout:
        return StudyLayout(self.output_dir)


@dataclass(frozen=True)
class StudyCreateRequest(StudyRequest):
    """`lvd study create`: pair the videos of two or more systems into a study."""

    systems: list[str] = setting(default_factory=list, flag="--system", repeat=True,
                                 help="NAME=DIR: one system's videos (give two or more)")
    axes: str = setting(",".join(DEFAULT_AXES), help="what raters judge, comma-separated: one forced choice each")
    gold: int = setting(0, min=0, max=10_000, help="gold pairs (a video against its degraded copy) to screen raters")
    seed: int = setting(0, help="seed of the left/right sides and of the gold picks")
    crf: int = setting(24, min=0, max=63, help="VP9 constant quality of the study's copies (lower = better)")

    def validate(self) -> None:
        super().validate()
        self.system_dirs()
        self.axis_names()

    def axis_names(self) -> list[str]:
        """The axes, checked: at least one, distinct, plain names."""
        names = [name.strip() for name in self.axes.split(",")]
        if len(set(names)) != len(names):
            raise RequestError(f"axes must be distinct, got {self.axes!r}")
        for name in names:
            check_name("axis", name)
        return names

    def system_dirs(self) -> dict[str, Path]:
        """{name: folder} from the NAME=DIR items, checked: at least two, distinct names."""
        systems: dict[str, Path] = {}
        for item in self.systems:
            name, equals, folder = item.partition("=")
            if not equals or not folder:
                raise RequestError(f"--system expects NAME=DIR, got {item!r}")
            check_name("system", name)
            if name == GOLD_DIR:
                raise RequestError(f"system name {GOLD_DIR!r} is reserved for the degraded copies of gold pairs")
            if name in systems:
                raise RequestError(f"system {name!r} given twice")
            if roots := allowed_roots():  # a served run reads only inside the roots it was given
                check_path_allowed(f"systems ({name})", folder, roots)
            systems[name] = Path(folder).expanduser()
        if len(systems) < 2:
            raise RequestError(f"a study compares at least two systems: give --system NAME=DIR twice or more "
                               f"(got {len(systems)})")
        return systems

    def check_inputs(self) -> None:
        if self.layout.study.exists():
            raise RequestError(f"{self.output_dir} already holds a study (its votes are kept): pick another folder")
        for name, folder in self.system_dirs().items():
            if not folder.is_dir():
                raise RequestError(f"system {name}: no such directory: {folder}")
            if not any(path.suffix.lower() in VIDEO_SUFFIXES for path in folder.iterdir()):
                raise RequestError(f"system {name}: no videos in {folder} ({', '.join(VIDEO_SUFFIXES)})")


@dataclass(frozen=True)
class StudyServeRequest(StudyRequest):
    """`lvd study serve`: the rating page and its API."""

    host: str = setting("127.0.0.1", help="address to listen on; anything but loopback requires a token")
    port: int = setting(8765, min=0, max=65535, help="port (0 = any free port)")
    token: str | None = setting(None, help="access token raters must have in the URL (default: a random one "
                                           "when the host is not loopback, none on loopback)")

    def validate(self) -> None:
        super().validate()
        if self.token is not None and not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", self.token):
            raise RequestError("token must be 16-128 letters, digits, '_' or '-'")

    def check_inputs(self) -> None:
        _require_study(self.layout)


@dataclass(frozen=True)
class StudyResultsRequest(StudyRequest):
    """`lvd study results`: the statistics of the votes cast so far."""

    min_gold_accuracy: float | None = setting(None, min=0, max=1, help="drop raters whose gold-pair accuracy is "
                                                                       "below this (raters without gold votes stay)")
    confidence: float = setting(0.95, min=0.5, max=0.999, help="level of the intervals")
    bootstrap_rounds: int = setting(1000, min=10, max=100_000, help="resamples for the Bradley-Terry intervals")
    bootstrap_seed: int = setting(0, help="seed of the bootstrap")
    bootstrap_unit: Literal["vote", "rater"] = setting("vote", help="what the bootstrap resamples: votes, or "
                                                                     "raters with all their votes (wider, honest "
                                                                     "when raters differ in taste; needs many raters)")

    def check_inputs(self) -> None:
        _require_study(self.layout)


@dataclass(frozen=True)
class StudyResultsCommand(StudyResultsRequest):
    print_json: bool = setting(False, flag="--json", help="print the results as JSON")


@dataclass(frozen=True)
class PreferenceFlowRequest(StudyCreateRequest, StudyServeRequest, StudyResultsRequest):
    """The `evaluate-preference` flow: create (or reopen) the study, serve it until enough votes are in, report."""

    votes_per_pair: int = setting(3, min=1, max=1000, help="raters who must have judged every pair on every axis")
    max_wait_minutes: float = setting(24 * 60, min=0, help="report with the votes in by then at the latest")
    poll_seconds: float = setting(5.0, min=0.05, max=3600, help="how often the flow counts the votes")

    def check_inputs(self) -> None:
        if self.layout.study.exists():
            _require_study(self.layout)
        else:
            StudyCreateRequest.check_inputs(self)


def _require_study(layout: StudyLayout) -> None:
    if not layout.study.is_file():
        raise RequestError(f"{layout.root}: not a study (no {layout.study.name}; create one with `lvd study "
                           "create`)")
