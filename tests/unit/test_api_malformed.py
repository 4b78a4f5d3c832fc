"""Every malformed manifest under malformed/ is rejected with a message that names the field.

Each fixture states what is wrong in its first comment line and lists, as `# expect: …`
lines, substrings the report must contain (the field path first, then the gist / the fix).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from branchmerge_operator.api import check_manifest, load_manifests, read_documents
from branchmerge_operator.validation import ManifestError

MALFORMED = sorted((Path(__file__).parent / "malformed").glob("*.yaml"))


def expectations(path: Path) -> list[str]:
    return re.findall(r"^# expect: (.*)$", path.read_text(), re.M)


def test_there_are_at_least_twenty_distinct_cases() -> None:
    assert len(MALFORMED) >= 20
    docs = [path.read_text().split("\n", 1)[1] for path in MALFORMED]
    assert len(set(docs)) == len(docs)


@pytest.mark.parametrize("path", MALFORMED, ids=[p.stem for p in MALFORMED])
def test_rejected_with_field_path_and_reason(path: Path) -> None:
    expected = expectations(path)
    assert expected, f"{path.name} has no '# expect:' lines"
    [doc] = read_documents(path)
    obj, report = check_manifest(doc, path.name)
    assert obj is None, f"{path.name} was accepted"
    text = "\n".join(report.lines())
    for needle in expected:
        assert needle in text, f"{path.name}: {needle!r} not in:\n{text}"
    # The first expectation is the field path: some line must start with it.
    assert any(line.startswith(expected[0]) for line in report.lines()), text


@pytest.mark.parametrize("path", MALFORMED[:3], ids=[p.stem for p in MALFORMED[:3]])
def test_load_manifests_raises_with_the_same_issues(path: Path) -> None:
    with pytest.raises(ManifestError) as err:
        load_manifests(path)
    assert expectations(path)[0] in str(err.value)
    assert err.value.issues
