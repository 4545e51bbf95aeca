"""The docs stand alone: nothing points outside the repository, every recipe citation names a real section of
docs/recipe.md, relative links resolve, and the README's table of contents matches its headings."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "CONTRIBUTING.md", "benchmarks/README.md", "docs/recipe.md"]
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


def test_readme_contents_list_every_section_in_order():
    readme = (ROOT / "README.md").read_text()
    contents = readme.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^( *)- \[[^\]]+\]\(#([^)]+)\)", contents, flags=re.MULTILINE)
    expected = [(level, github_anchor(text)) for level, text in headings(readme) if text != "Contents"]
    assert [(len(indent) // 2 + 2, anchor) for indent, anchor in listed] == expected
