"""The scorer graph: one `ScorerSpec` per scorer in one table (`SCORERS`, filled in curation/scorers/__init__.py).

Everything that used to spell scorer names derives from the table: which scorers run for a config
(`active_scorers`), which are off and why (`unavailable_scorers`), which settings section each reads, the
columns each writes, and the order in which `annotate` (curation/actors.py) feeds the pools (`schedule`).
A scorer that reads another's output lists it in `needs` (it is off unless they run: the LLM summary) or in
`uses` (it waits for it when it runs, else scores without: the CLIP text score and the CoCa caption).
Registration rejects an unknown need or a cycle with one line, so a broken graph never reaches a run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from common.requests import RequestError
from curation.types import ClipFrames


@dataclass(frozen=True)
class ScorerSpec:
    """One scorer, declared once: everything the pipeline needs to know to switch it on and schedule it."""

    name: str  # also its settings field in ScorersConfig and its pool's name in reports
    scorer: str  # "module:Class" of its `ClipScorer`, imported only when an actor builds it
    settings: type  # its frozen `Settings` dataclass (enabled, pool, missing_setting()), checked when built
    columns: tuple[str, ...]  # the manifest columns it writes (dataformat.schema.Column members)
    needs: tuple[str, ...] = ()  # scorers whose output it reads; it is off unless they run
    uses: tuple[str, ...] = ()  # scorers whose output it reads when they run in the same call
    reads: str = ""  # what it does with its needs, for the one-line messages ("summarises ...")
    # a clip this returns True for is scored at once, without waiting for `uses` (a clip with its own caption)
    ready_without_uses: Callable[[ClipFrames], bool] | None = None
    per_clip: bool = True  # False: not active per clip; a later pass asks `annotate` for it (RAFT in hq)
    shows: str = ""  # what the run report says it fills; default: its columns
    error_prefix: str = ""  # how its error rows begin (the name `score_isolated` gets); default: its name
    # whether its actors can use a GPU with these settings (a backend without a GPU build); default: they can
    can_use_gpu: Callable[[Any], bool] | None = None

    def gpu_usable(self, settings: Any) -> bool:
        """Whether a GPU share helps this scorer with `settings` (else its actors take none)."""
        return self.can_use_gpu is None or self.can_use_gpu(settings)

    @property
    def report_label(self) -> str:
        return self.shows or " / ".join(self.columns)

    @property
    def errors_start(self) -> str:
        return f"{self.error_prefix or self.name}:"

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.needs + self.uses


SCORERS: dict[str, ScorerSpec] = {}


def register(spec: ScorerSpec, replace: bool = False) -> ScorerSpec:
    """Add `spec` to the table; an unknown need, a duplicate name or a cycle is one RequestError line."""
    if spec.name in SCORERS and not replace:
        raise RequestError(f"scorer {spec.name!r} is already registered")
    unknown = [name for name in spec.inputs if name not in SCORERS and name != spec.name]
    if unknown:
        raise RequestError(f"scorer {spec.name!r} needs {', '.join(map(repr, unknown))}, which no scorer registers; "
                           f"known: {', '.join(SCORERS)}")
    table = {**SCORERS, spec.name: spec}
    cycle = _find_cycle(table)
    if cycle:
        raise RequestError(f"scorer {spec.name!r} closes a cycle in the scorer graph: {' -> '.join(cycle)}")
    SCORERS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Remove a scorer that no other scorer needs (tests register their own and take them out again)."""
    dependants = [other.name for other in SCORERS.values() if name in other.inputs and other.name != name]
    if dependants:
        raise RequestError(f"scorer {name!r} is needed by {', '.join(dependants)}")
    SCORERS.pop(name, None)


def spec_of(name: str) -> ScorerSpec:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}")
    return SCORERS[name]


def settings_of(config: Any, name: str) -> Any:
    """The settings section of scorer `name`: its `ScorersConfig` field, or its settings class's defaults
    for a scorer registered without one (a test's scorer)."""
    spec = spec_of(name)
    section = getattr(config, name, None)
    return section if isinstance(section, spec.settings) else spec.settings()


def build_scorer(spec: ScorerSpec, settings: Any, device: str = "auto", threads: int = 1) -> Any:
    """Instantiate (and load the model of) the scorer `spec` declares, from its settings section."""
    module, cls = spec.scorer.split(":")
    return getattr(importlib.import_module(module), cls)(settings, device, threads)


def unavailable_scorers(config: Any) -> dict[str, str]:
    """Enabled scorers that cannot run -> why and the setting to fill: no weights configured, or a need that
    is off (transitively: a need that is itself unavailable)."""
    missing: dict[str, str] = {}
    for spec in _in_order():  # needs come first
        settings = settings_of(config, spec.name)
        if not getattr(settings, "enabled", True):
            continue
        setting = settings.missing_setting() if hasattr(settings, "missing_setting") else None
        if setting:
            missing[spec.name] = f"off: no weights configured; set {setting}"
            continue
        lacking = [need for need in spec.needs
                   if not getattr(settings_of(config, need), "enabled", True) or need in missing]
        if lacking:
            what = spec.reads or f"reads the output of {' and '.join(spec.needs)}"
            missing[spec.name] = f"off: it {what}; switch on " + " and ".join(f"scorers.{n}" for n in lacking)
    return missing


def active_scorers(config: Any) -> list[str]:
    """Per-clip scorers that are enabled and can run, in schedule order."""
    missing = unavailable_scorers(config)
    return [spec.name for spec in _in_order() if spec.per_clip and spec.name not in missing
            and getattr(settings_of(config, spec.name), "enabled", True)]


def schedule(names: Iterable[str]) -> list[str]:
    """`names` in the order `annotate` feeds them (every scorer after the scorers it reads), checked: each is a
    known scorer and every need of each is in the same call (a later pass names its scorers, as hq does RAFT)."""
    names = list(dict.fromkeys(names))
    for name in names:
        spec = spec_of(name)
        absent = [need for need in spec.needs if need not in names]
        if absent:
            what = spec.reads or f"reads the output of {' and '.join(spec.needs)}"
            raise ValueError(f"the {name} scorer {what}: it needs the {' and '.join(spec.needs)} scorers "
                             "in the same call")
    return [spec.name for spec in _in_order() if spec.name in names]


def inputs_in_call(name: str, names: Iterable[str]) -> tuple[str, ...]:
    """The scorers of this call whose output scorer `name` waits for."""
    names = set(names)
    return tuple(other for other in spec_of(name).inputs if other in names)


def _in_order() -> list[ScorerSpec]:
    """The table in a topological order of its needs graph (every scorer after its inputs), else as registered."""
    done: dict[str, ScorerSpec] = {}

    def visit(spec: ScorerSpec) -> None:
        if spec.name not in done:
            for other in spec.inputs:
                visit(SCORERS[other])
            done[spec.name] = spec

    for spec in SCORERS.values():
        visit(spec)
    return list(done.values())


def _find_cycle(table: dict[str, ScorerSpec]) -> list[str]:
    """A path name -> ... -> name in the needs graph, or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        path.append(name)
        for need in table[name].inputs if name in table else ():
            if state.get(need) == 1:
                return path[path.index(need):] + [need]
            if need not in state:
                found = visit(need)
                if found:
                    return found
        path.pop()
        state[name] = 2
        return []

    for name in table:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return []
