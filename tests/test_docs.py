"""README.md and docs/*.md point only at things that exist: every relative link and image (and its
#anchor), every path into the repository's folders, every dotted module name of our packages and every
name a code example imports from them. README's layout table lists exactly the modules of each folder,
README's test command is the one .ci/run runs, and no page cites a file outside the repository.
Pure text checks: nothing is imported or run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PACKAGES = ("clip_stage", "llava_address", "conversations")
# folders whose paths the pages name as files of this repository
PATH_ROOTS = (*PACKAGES, "scripts", "ds_configs", "tests", "docs", "requirements")

FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# a path token starts at a word boundary that is not part of a longer path (runs/demo/conversations/...)
PATH = re.compile(r"(?<![\w/.\-~])((?:%s)/[\w./*\-]*)" % "|".join(PATH_ROOTS))
DOTTED = re.compile(r"(?<![\w/.\-])((?:%s)(?:\.[A-Za-z_]\w*)+)" % "|".join(PACKAGES))
FILE_SUFFIXES = {"md", "py", "json", "jsonl", "yaml", "png", "csv", "parquet"}
FROM_IMPORT = re.compile(r"^\s*from\s+((?:%s)(?:\.\w+)*)\s+import\s+([\w\s,()]+)$" % "|".join(PACKAGES), re.M)


def _rel(page: Path) -> str:
    return page.relative_to(REPO).as_posix()


def _headings(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"^#{1,6} +(.+?) *$", FENCE.sub("", text), re.M)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: link targets and backticks dropped, lower case, punctuation
    other than '-' and '_' removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in _headings(page.read_text()):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _module_file(dotted: str) -> Path | None:
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _defines(module: Path, name: str) -> bool:
    """The module (or its package) has `name` as a submodule or mentions it as a whole word
    (a def, class, assignment or re-export)."""
    if module.name == "__init__.py" and _module_file_in(module.parent, name):
        return True
    return re.search(rf"\b{re.escape(name)}\b", module.read_text()) is not None


def _module_file_in(folder: Path, name: str) -> bool:
    return (folder / f"{name}.py").is_file() or (folder / name / "__init__.py").is_file()


def test_pages_exist():
    names = {p.name for p in PAGES if p.parent.name == "docs"}
    assert {"README.md", "data-formats.md", "data.md", "addressclip.md", "conversations.md", "llava.md",
            "evaluation.md", "benchmarks.md", "configuration.md", "testing.md"} <= names


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_links_and_anchors_resolve(page):
    problems = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path_part, _, anchor = target.partition("#")
        dest = (page.parent / path_part).resolve() if path_part else page
        if REPO not in dest.parents and dest != REPO:
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            problems.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not problems, f"{_rel(page)}: " + "; ".join(problems)


def test_every_docs_page_is_linked_from_readme_and_index():
    readme = (REPO / "README.md").read_text()
    index = (REPO / "docs" / "README.md").read_text()
    for page in PAGES:
        if page.parent.name != "docs" or page.name == "README.md":
            continue
        assert f"(docs/{page.name})" in readme, f"README.md does not link docs/{page.name}"
        assert f"({page.name})" in index, f"docs/README.md does not link {page.name}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_repository_paths_exist(page):
    missing = []
    for token in PATH.findall(page.read_text()):
        token = token.rstrip(".,;:")
        if "<" in token or "{" in token:
            continue
        if "*" in token:
            if not list(REPO.glob(token)):
                missing.append(token)
        elif not (REPO / token).exists():
            missing.append(token)
    assert not missing, f"{_rel(page)} names paths that do not exist: {sorted(set(missing))}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_module_names_resolve(page):
    """`clip_stage.data.build.check_chunk`: the longest prefix that is a module exists, and the next
    name is defined in it."""
    problems = []
    for dotted in set(DOTTED.findall(page.read_text())):
        parts = dotted.split(".")
        if parts[-1] in FILE_SUFFIXES:
            continue  # a file name such as conversations.md, not a module
        for i in range(len(parts), 0, -1):
            module = _module_file(".".join(parts[:i]))
            if module is not None:
                break
        if module is None or i == 1 and len(parts) > 1 and not _defines(module, parts[1]):
            problems.append(dotted)
        elif i < len(parts) and not _defines(module, parts[i]):
            problems.append(dotted)
    assert not problems, f"{_rel(page)} names modules or attributes that do not exist: {sorted(problems)}"


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_code_examples_import_what_exists(page):
    problems = []
    for module_name, names in FROM_IMPORT.findall(page.read_text()):
        module = _module_file(module_name)
        if module is None:
            problems.append(module_name)
            continue
        # `import a, b as c`: the imported names are the first word of each item
        for name in (item.split()[0] for item in names.strip("() \n").split(",") if item.strip()):
            if not _defines(module, name):
                problems.append(f"{module_name}.{name}")
    assert not problems, f"{_rel(page)}: code examples import what does not exist: {problems}"


def _layout_rows() -> dict[str, str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Repository layout", 1)[1]
    return dict(re.findall(r"^\| `([\w/]+/)` \| (.+) \|$", section, re.M))


def test_readme_layout_lists_every_module():
    rows = _layout_rows()
    problems = []
    for folder in (f for f in rows if f.split("/")[0] in PACKAGES):
        listed = {n.rstrip("/") for n in re.findall(r"`([a-z_]+/?)`", rows[folder])}
        present = {p.stem for p in (REPO / folder).glob("*.py") if p.stem != "__init__"}
        present |= {p.name for p in (REPO / folder).iterdir()
                    if p.is_dir() and not p.name.startswith((".", "__")) and f"{folder}{p.name}/" not in rows}
        if listed - present:
            problems.append(f"{folder}: listed but absent {sorted(listed - present)}")
        if present - listed:
            problems.append(f"{folder}: present but not listed {sorted(present - listed)}")
    for folder in rows:
        if not (REPO / folder).is_dir():
            problems.append(f"{folder}: no such folder")
    assert not problems, "README layout: " + "; ".join(problems)


def test_readme_commands_are_the_ci_commands():
    """.ci/run runs README's test command exactly; both fresh-machine commands open the README."""
    head = (REPO / "README.md").read_text().split("\n## ", 1)[0]
    commands = re.findall(r"^    (bash scripts/setup\.sh && .+)$", head, re.M)
    assert commands == ["bash scripts/setup.sh && .venv/bin/address-llava demo --out runs/demo",
                        "bash scripts/setup.sh && .venv/bin/python -m pytest -q"]
    assert commands[1] in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_no_citation_outside_the_repository(page):
    text = page.read_text()
    for bad in ("STACK.md", "../shared", "/work/"):
        assert bad not in text, f"{_rel(page)} cites {bad}"
