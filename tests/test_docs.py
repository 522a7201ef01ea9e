"""The documentation stays true: the option table is the server's, CI runs the README's test command, links resolve."""

from __future__ import annotations

import re
from pathlib import Path

from convserve.server.config import OPTIONS, markdown_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIGURATION = ROOT / "docs" / "configuration.md"  # the option table, generated from OPTIONS
TABLE_START = re.compile(r"^<!-- options-table:start.*-->$", re.M)
TABLE_END = "<!-- options-table:end -->"
SKIPPED = {"out", "runs", "build", "dist"}  # generated, git-ignored
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _readme_table() -> str:
    text = CONFIGURATION.read_text()
    start = TABLE_START.search(text)
    assert start, "docs/configuration.md lost its options-table:start marker"
    end = text.index(TABLE_END, start.end())
    return text[start.end() : end].strip()


def test_readme_option_table_is_generated_from_options():
    assert _readme_table() == markdown_table(), (
        "docs/configuration.md's option table differs from server/config.py OPTIONS: run "
        "`python -m convserve.server.config` and paste its output between the markers"
    )


def test_every_option_has_a_row_with_flag_and_variable():
    rows = _readme_table().splitlines()[2:]
    assert len(rows) == len(OPTIONS)
    for opt, row in zip(OPTIONS, rows):
        assert row.startswith(f"| `{opt.flag}") and f"`{opt.env}`" in row, row


def test_readme_is_short():
    lines = README.read_text().count("\n")
    assert lines < 300, f"README.md has {lines} lines; move detail into docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def _markdown_files() -> list[Path]:
    return [
        README,
        ROOT / "CONTRIBUTING.md",
        ROOT / "BENCHMARKS.md",
        *sorted(ROOT.glob("docs/*.md")),
    ]


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in _markdown_files():
        text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue  # an external URL
            file_part, _, anchor = target.partition("#")
            path = (doc.parent / file_part).resolve() if file_part else doc
            if not path.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def test_no_reference_to_notes_outside_the_repository():
    outside = ("..", "shared", "docs")
    pattern = re.compile("/".join(outside) + "|/work/" + outside[1])
    hits = []
    for path in ROOT.rglob("*"):
        parts = path.relative_to(ROOT).parts
        if parts[0] in SKIPPED or any(p.startswith(".") and p != ".ci" for p in parts):
            continue
        if any(p == "__pycache__" or p.endswith(".egg-info") for p in parts):
            continue
        if (
            path.is_file()
            and path.suffix in (".md", ".py", ".sh", ".toml", "")
            and path.stat().st_size < 1_000_000
        ):
            text = path.read_text(errors="replace")
            hits += [f"{path.relative_to(ROOT)}" for _ in pattern.finditer(text)]
    assert not hits, f"the repository must not point at notes outside it: {sorted(set(hits))}"


def test_ci_runs_the_readme_test_command_verbatim():
    """The second quick-start command is exactly what CI runs, so a green CI proves it."""
    readme = README.read_text()
    quick = readme[readme.index("## Quick start") :]
    blocks = re.findall(r"```sh\n(.*?)\n```", quick, re.S)
    test_command = next(b for b in blocks if "pytest" in b)
    ci = (ROOT / ".ci" / "run").read_text()
    start = ci.index("# readme-test-command:start\n") + len("# readme-test-command:start\n")
    ci_command = ci[start : ci.index("# readme-test-command:end")]
    assert ci_command.split(" \\\n")[0] == test_command
