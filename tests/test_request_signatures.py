"""Requests all the way down: a library entry point takes its frozen request (or a typed settings section), never
the request's fields copied out as loose keyword arguments.

The rule, over every public function and method of the library packages: no signature may share
`MAX_SHARED` or more parameter names with the fields of one request or settings section (a dataclass declared
with `setting(...)`). A function with that many of a request's knobs is the request spelled a second time: the
two drift apart (a default changed in one place only, a new field that never reaches the work).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from collections.abc import Iterator

from common.requests import Request

LIBRARY = ("curation", "training", "evaluation", "generation", "model")
MAX_SHARED = 6

# Functions allowed to share MAX_SHARED or more names with a request, each with its reason.
EXCEPTIONS: dict[str, str] = {
    "generation.generate.draw_first_frame":
        "takes the loaded text-to-image model and the resolved values (mode defaults filled in, the first prompt), "
        "not the request's fields: the same call draws the first frame for any caller",
}


def library_modules() -> list:
    modules = []
    for package_name in LIBRARY:
        package = importlib.import_module(package_name)
        modules.append(package)
        modules += [importlib.import_module(info.name)
                    for info in pkgutil.walk_packages(package.__path__, package_name + ".")]
    return modules


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def settings_classes(modules: list) -> set[type]:
    """Every request, and every dataclass whose fields are declared with `setting(...)` (its sections)."""
    found = set(_subclasses(Request))
    for module in modules:
        for value in vars(module).values():
            if (inspect.isclass(value) and dataclasses.is_dataclass(value) and value.__module__ == module.__name__
                    and any("help" in f.metadata for f in dataclasses.fields(value))):
                found.add(value)
    return found


def public_functions(modules: list) -> Iterator[tuple[str, object]]:
    """Module-level functions and the methods of module-level classes (a dataclass's generated constructor is the
    request itself, not a copy of it)."""
    for module in modules:
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(value):
                yield f"{module.__name__}.{name}", value
            elif inspect.isclass(value):
                for member, function in vars(value).items():
                    public = not member.startswith("_") or (member == "__init__"
                                                            and not dataclasses.is_dataclass(value))
                    if public and inspect.isfunction(function):
                        yield f"{module.__name__}.{name}.{member}", function


def test_no_library_function_takes_a_requests_fields_as_keywords():
    modules = library_modules()
    classes = settings_classes(modules)
    assert {"WalkRequest", "GenerateRequest", "FolderFvdRequest", "StageRunRequest"} <= {c.__name__ for c in classes}
    functions = list(public_functions(modules))
    assert len(functions) > 200, "the scan must see the library"
    offenders, used = [], set()
    for cls in classes:
        fields = {f.name for f in dataclasses.fields(cls)}
        for qualified, function in functions:
            shared = set(inspect.signature(function).parameters) & fields
            if len(shared) < MAX_SHARED:
                continue
            if qualified in EXCEPTIONS:
                used.add(qualified)
                continue
            offenders.append(f"{qualified} takes {len(shared)} fields of {cls.__name__}: {sorted(shared)}")
    assert not offenders, "pass the request instead:\n" + "\n".join(sorted(offenders))
    assert used == set(EXCEPTIONS), "an exception no longer needed: remove it"


def test_the_rule_catches_a_keyword_copy():
    """The check itself: a function spelling out WalkRequest's fields is caught, one taking the request is not."""
    from generation.render import WalkRequest

    fields = {f.name for f in dataclasses.fields(WalkRequest)}

    def copied(pipe, prompts, out, *, seeds=None, steps=25, guidance=7.0, fps=8.0, overlap=2, window=None):
        """A keyword copy of the request."""

    def takes_request(pipe, request: WalkRequest, *, progress: bool = True):
        """The request itself."""

    assert len(set(inspect.signature(copied).parameters) & fields) >= MAX_SHARED
    assert len(set(inspect.signature(takes_request).parameters) & fields) < MAX_SHARED

