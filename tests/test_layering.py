"""The package layering (CONTRIBUTING.md): which shipped package may import which, and no import cycles.

Every `import` / `from ... import` in every module of the shipped packages is read from the source (AST,
function-level imports included, nothing is executed), so a lazy import inside a function counts as much
as one at the top of a file: both make the importing package depend on the imported one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# package -> the other project packages it may import (its own modules are always allowed).
ALLOWED: dict[str, set[str]] = {
    "dataformat": set(),
    "common": set(),
    "infra": {"dataformat"},  # the driver watchdog reads process liveness the way the OUT lock does
    "model": {"common"},
    "curation": {"dataformat", "common", "infra"},
    "training": {"model", "dataformat", "common", "infra"},
    "evaluation": {"model", "dataformat", "common", "infra"},
    "generation": {"model", "dataformat", "common"},
    "flows": {"dataformat", "common", "infra", "model", "curation", "training", "evaluation", "generation"},
}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the shipped packages present under `root`."""
    modules: dict[str, Path] = {}
    for package in ALLOWED:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of everything `path` imports, relative imports resolved, `from a import b`
    giving `a.b` (a submodule or a name inside `a`; the caller decides which exists)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield node.lineno, f"{source}.{alias.name}" if alias.name != "*" else source


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}; a `from a import name` edge goes to `a.name` when
    that is a module, else to `a`."""
    modules = module_files(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for line, name in imported_names(path, module):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                edges.setdefault(name, line)
        graph[module] = edges
    return graph


def forbidden_imports(root: Path) -> list[str]:
    """'file:line: a.b imports c.d (a may import only ...)' for every import against ALLOWED."""
    modules, problems = module_files(root), []
    for module, edges in import_graph(root).items():
        package = module.split(".")[0]
        for target, line in edges.items():
            other = target.split(".")[0]
            if other != package and other not in ALLOWED[package]:
                allowed = ", ".join(sorted(ALLOWED[package])) or "nothing of the project"
                problems.append(f"{modules[module].relative_to(root)}:{line}: {module} imports {target} "
                                f"({package} may import {allowed})")
    return sorted(problems)


def import_cycles(root: Path) -> list[list[str]]:
    """Strongly connected groups of two or more modules (Tarjan), each sorted; a module importing itself
    is not possible here (self-edges are dropped when the graph is built)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, {}):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_packages_import_only_downward():
    problems = forbidden_imports(ROOT)
    assert not problems, "imports against the layering:\n" + "\n".join(problems)


def test_no_import_cycles_between_modules():
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path):
    """The checker itself: a function-level model -> curation import and a two-module cycle are reported."""
    for package in ("model", "curation", "common"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "model" / "a.py").write_text("def f():\n    from curation.b import g\n    return g\n")
    (tmp_path / "curation" / "b.py").write_text("from common import c\n\ndef g():\n    return c\n")
    (tmp_path / "common" / "c.py").write_text("from . import d\n")
    (tmp_path / "common" / "d.py").write_text("def h():\n    from common.c import x\n")
    assert forbidden_imports(tmp_path) == [
        "model/a.py:2: model.a imports curation.b (model may import common)"]
    assert import_cycles(tmp_path) == [["common.c", "common.d"]]


# ------------------------------------------------------------------------------ the on-disk contract

# File and directory names of the project's outputs: spelled once, in dataformat/ (and the cache root's in
# common/cache.py); every other package asks a layout (`RunLayout`, `StageLayout`, `CheckpointLayout`,
# `EvaluationLayout`, `PipelineLayout`) for them.
CONTRACT_NAMES = frozenset({
    ".lvd-lock", "sources.parquet", "manifest.parquet", "summary.json", "report.md", "results.json",
    "sample_grid.jpg", "done.json", "lineage.json", "metrics.jsonl", "progress.json", "loss.png", "files.json",
    "state.json", "rng.json", "unet.safetensors", "ema.safetensors", "optimizer.pt",
    "checkpoint_manager_snapshot.json", "pipeline.md", "pipeline.json", ".pipeline", "fvd-real-clips",
})
# training/trainer.py still spells its checkpoint's files (CheckpointLayout has them): it is being changed in
# parallel this round; the move is left to its merge.
NOT_YET_MOVED = {"training/trainer.py": {"rng.json", "state.json", "unet.safetensors", "ema.safetensors",
                                         "optimizer.pt"}}


def contract_names_spelled(path: Path) -> Iterator[tuple[int, str]]:
    """(line, name) of each string literal (docstrings aside) that is, or ends with, a contract file name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            for name in CONTRACT_NAMES:
                if node.value == name or node.value.endswith("/" + name):
                    yield node.lineno, name


def test_output_paths_are_spelled_only_in_dataformat():
    offenders = []
    for package in set(ALLOWED) - {"dataformat"}:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            for line, name in contract_names_spelled(path):
                if name not in NOT_YET_MOVED.get(relative, set()):
                    offenders.append(f"{relative}:{line}: {name!r} (ask its layout in dataformat/)")
    assert not offenders, "output file names spelled outside dataformat/:\n" + "\n".join(offenders)


def test_dataformat_holds_formats_not_processes():
    """Whether a process runs (the output lock's holder, a worker's driver) is infra's business: dataformat,
    which infra may import, reads and names files only."""
    process_modules = {"psutil", "socket", "signal", "subprocess", "atexit"}
    found = [f"{path.relative_to(ROOT)}:{line}: {name}"
             for path in sorted((ROOT / "dataformat").rglob("*.py"))
             for line, name in imported_names(path, "dataformat") if name.split(".")[0] in process_modules]
    assert not found, "process handling in dataformat/:\n" + "\n".join(found)


def test_one_cache_root():
    """~/.cache/lvd and its environment variables are spelled in common/cache.py only."""
    offenders = []
    for path in [*sorted(ROOT.glob("*/**/*.py"))]:
        relative = path.relative_to(ROOT)
        if relative.parts[0] in {"tests", ".venv"} or relative == Path("common/cache.py"):
            continue
        text = path.read_text(errors="ignore")
        for marker in ('".cache"', "LVD_HOME", "LVD_CACHE_DIR"):
            if marker in text:
                offenders.append(f"{relative}: {marker}")
    assert not offenders, "cache paths outside common/cache.py:\n" + "\n".join(offenders)


def test_the_cache_root_is_lvd_home_then_its_alias_then_the_default(monkeypatch, tmp_path):
    from common.cache import cache_root, i3d_cache, sample_cache

    monkeypatch.delenv("LVD_HOME", raising=False)
    monkeypatch.delenv("LVD_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "lvd"
    monkeypatch.setenv("LVD_CACHE_DIR", str(tmp_path / "older"))
    assert cache_root() == tmp_path / "older" and i3d_cache() == tmp_path / "older" / "i3d"
    monkeypatch.setenv("LVD_HOME", str(tmp_path / "lvd"))
    assert cache_root() == tmp_path / "lvd" and sample_cache() == tmp_path / "lvd" / "sample"


FLOW_LOADING = {"load_pipeline", "from_pretrained", "from_sd_checkpoint", "I3DFeatureExtractor", "ClipSimilarity"}
# Calls that write, make or remove files and folders: a flow asks dataformat (a layout's methods, the atomic
# writers) or the library doing the work for them.
FLOW_WRITING = {"write_text", "write_bytes", "save", "save_video", "write_video", "savez", "imwrite", "mkdir",
                "makedirs", "rmtree", "unlink", "touch", "rename", "symlink_to", "copyfile", "copytree"}


def flow_offenders(package: Path) -> list[str]:
    """'file:line: what' for each model load, file write, folder make/remove or open-for-writing in `package`."""
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package.parent)
        for line, name in imported_names(path, "flows"):
            if name == "model.loading" or name.rsplit(".", 1)[-1] in FLOW_LOADING:
                offenders.append(f"{relative}:{line}: imports {name}")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if not isinstance(node, ast.Call):
                continue
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if called in FLOW_LOADING | FLOW_WRITING:
                offenders.append(f"{relative}:{node.lineno}: calls {called}")
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
                      and isinstance(k.value.value, str)]
            if called in ("open", "fdopen") and any(set(mode) & set("wax+") for mode in modes):
                offenders.append(f"{relative}:{node.lineno}: opens a file for writing")
    return offenders


def test_flows_load_no_models_and_write_files_only_atomically():
    """Flows orchestrate: a model is loaded by the library a flow calls (model.loading behind generation,
    evaluation and training); what a flow writes, makes or removes on disk goes through dataformat (a layout's
    methods, the atomic writers) or the library doing the work."""
    offenders = flow_offenders(ROOT / "flows")
    assert not offenders, "model loading or direct file writing in flows/:\n" + "\n".join(offenders)


def test_the_flow_checker_sees_writes_folders_and_loading(tmp_path):
    flows = tmp_path / "flows"
    flows.mkdir()
    (flows / "bad.py").write_text(
        "import shutil\nfrom model.loading import load_pipeline\n\ndef f(out, pipe):\n    out.mkdir(parents=True)\n"
        "    shutil.rmtree(out)\n    (out / 'a').write_text('x')\n    open(out / 'b', mode='ab')\n"
        "    pipe.from_pretrained(out)\n    open(out / 'c').read()\n")
    assert flow_offenders(flows) == [
        "flows/bad.py:2: imports model.loading.load_pipeline", "flows/bad.py:5: calls mkdir",
        "flows/bad.py:6: calls rmtree", "flows/bad.py:7: calls write_text", "flows/bad.py:8: opens a file for writing",
        "flows/bad.py:9: calls from_pretrained"]
