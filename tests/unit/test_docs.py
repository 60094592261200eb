"""The repository documents itself: every document the code, scenarios and docs cite is in the
repository, and none of them speaks of issue numbers (a user has only the clone)."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TEXT = ("*.py", "*.md", "*.yaml", "*.yml", "*.sh", "*.toml", "*.txt", "Makefile", "Dockerfile", ".ci/run")
CITED = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)(?:#[\w-]+)?")
WRITTEN = {"report.md"}  # what a run writes into its folder: a name, not a document of ours
RUN_FOLDER = re.compile(r"(?:(?:[A-Z]+|seed-\d+)/)*")  # DIR/, OUT/, seed-2/: places in a run's folder


def written_by_a_run(cited: str) -> bool:
    folder, _, name = cited.rpartition("/")
    return name in WRITTEN and RUN_FOLDER.fullmatch(folder + "/" if folder else "") is not None
ISSUE = re.compile(r"\b[Ii]ssues? #?\d+|\bthe issue('s)?\b|\bticket #?\d+")


def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", *TEXT], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [ROOT / f for f in out.splitlines() if (ROOT / f).is_file()]


def citations(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    text = re.sub(r"https?://\S+", "", text)  # an address on the web is not a file of ours
    return CITED.findall(text)


def test_the_files_are_found():
    files = {p.relative_to(ROOT).as_posix() for p in tracked()}
    assert {"README.md", "docs/architecture.md", "testbed/runner.py", "scenarios/smoke.yaml"} <= files


def test_every_cited_document_is_in_the_repository():
    missing = []
    for path in tracked():
        if path == Path(__file__):  # its own examples
            continue
        for cited in set(citations(path)):
            if not written_by_a_run(cited) and not ((ROOT / cited).is_file() or (path.parent / cited).is_file()):
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", ["architecture.md", "strategies.md", "profiles.md", "results.md"])
def test_the_design_documents_exist_and_the_index_names_them(doc):
    assert (ROOT / "docs" / doc).stat().st_size > 2000
    assert f"]({doc})" in (ROOT / "docs" / "README.md").read_text()


def test_no_issue_numbers_in_code_or_docs():
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in tracked() if p.suffix != ".py" or "tests" not in p.parts
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if ISSUE.search(line)]
    assert not found, "\n".join(found)


def test_the_checker_catches_what_it_looks_for(tmp_path):
    f = tmp_path / "x.py"
    f.write_text('"""See PLANNING.md and docs/none.md, not https://example.org/README.md."""\n')
    assert citations(f) == ["PLANNING.md", "docs/none.md"]
    assert ISSUE.search("as issue 6 says") and ISSUE.search("(the issue's check)") and not ISSUE.search("tissue 6")
