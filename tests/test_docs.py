"""The project's design notes live in the project: nothing cites a document outside the repository.

The rule, over every file git tracks (`git ls-files`):

1. No file names the workspace's paper summary that docs/ replaced (the upper-case PAPER + ".md"):
   the paper's method, our decisions, its units and the reference figures are in docs/paper.md.
2. A path that leaves the repository for the workspace's shared folder (`../shared/...`,
   `/work/shared/...`, or `"shared" / "..."` built in code, as tests/conftest.py builds
   REPO_ROOT.parent / "shared" / "data") names only its data folder, `shared/data`: the photographs
   and samples that tests and benchmarks read when present (EMCA_SHARED_DATA overrides where), never
   a document.
3. A relative link in a Markdown file resolves to a file or folder inside the repository.
4. A citation of a design note, `docs/<name>.md#<section>` in any file or `(#<section>)` inside
   docs/, names a note that exists and one of its headings (GitHub's anchors).

URLs (papers, repositories, issues) are citations of public documents and are not paths.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SUMMARY_NAME = "PAPER" + ".md"  # spelt in two parts so that this file does not name it itself
# A path into the workspace's shared folder, and what follows it.
SHARED_PATH = re.compile(r"(?:\.\./|/work/)shared(?P<rest>/[^\s`'\")\]]*)?")
SHARED_IN_CODE = re.compile(r"""["']shared["']\s*/\s*["'](?P<next>[^"']+)["']""")
MARKDOWN_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
NOTE_CITATION = re.compile(r"docs/(?P<note>[\w./-]+\.md)(?:#(?P<anchor>[\w-]+))?")
LOCAL_ANCHOR = re.compile(r"\]\(#(?P<anchor>[\w-]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.MULTILINE)


def tracked_text_files() -> dict[str, str]:
    """{path relative to the repository: text} of the tracked files present in the checkout."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
    files = {}
    for name in filter(None, listing.decode().split("\0")):
        path = REPO_ROOT / name
        if path.is_file():
            data = path.read_bytes()
            if b"\0" not in data:  # binary files cite nothing
                files[name] = data.decode("utf-8", errors="replace")
    return files


@pytest.fixture(scope="module")
def files() -> dict[str, str]:
    return tracked_text_files()


def where(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def anchor(title: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    title = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)  # no headings in code blocks
    return {anchor(match["title"]) for match in HEADING.finditer(text)}


def test_no_file_names_the_paper_summary_outside_the_repository(files):
    offenders = [f"{name}:{where(text, match.start())}"
                 for name, text in files.items() for match in re.finditer(re.escape(SUMMARY_NAME), text)]
    assert offenders == [], f"cite docs/paper.md#<section> instead of {SUMMARY_NAME}: {offenders}"


def test_paths_out_of_the_repository_name_only_the_shared_data(files):
    offenders = []
    for name, text in files.items():
        if name == "tests/test_docs.py":
            continue  # this file states the rule: its docstring spells the forms it forbids

        for match in SHARED_PATH.finditer(text):
            if not (match["rest"] or "").startswith("/data"):
                offenders.append(f"{name}:{where(text, match.start())}: {match[0]}")
        for match in SHARED_IN_CODE.finditer(text):
            if match["next"] != "data":
                offenders.append(f"{name}:{where(text, match.start())}: {match[0]}")
    assert offenders == [], f"a document outside the repository is cited (design notes belong in docs/): {offenders}"


def test_markdown_links_stay_inside_the_repository(files):
    offenders = []
    for name, text in files.items():
        if not name.endswith(".md"):
            continue
        for match in MARKDOWN_LINK.finditer(text):
            target = match["target"].split("#", 1)[0]
            if not target or re.match(r"[a-z][a-z0-9+.-]*:", target):  # a local anchor or a URL
                continue
            resolved = ((REPO_ROOT / name).parent / target).resolve()
            if not (resolved.is_relative_to(REPO_ROOT) and resolved.exists()):
                offenders.append(f"{name}:{where(text, match.start())}: {match['target']}")
    assert offenders == [], f"links that leave the repository or lead nowhere: {offenders}"


def test_every_cited_design_note_section_exists(files):
    notes = {name.removeprefix("docs/"): anchors(text) for name, text in files.items()
             if name.startswith("docs/") and name.endswith(".md")}
    assert "paper.md" in notes
    offenders = []
    for name, text in files.items():
        for match in NOTE_CITATION.finditer(text):
            if match["note"] not in notes or (match["anchor"] and match["anchor"] not in notes[match["note"]]):
                offenders.append(f"{name}:{where(text, match.start())}: {match[0]}")
        if name.startswith("docs/"):
            offenders += [f"{name}:{where(text, m.start())}: #{m['anchor']}"
                          for m in LOCAL_ANCHOR.finditer(text) if m["anchor"] not in notes[name.removeprefix("docs/")]]
    assert offenders == [], f"citations of a design note or section that does not exist: {offenders}"
