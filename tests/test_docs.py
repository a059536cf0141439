"""The README and the docs: a short front door, every relative link resolving, and every generated
figure stamped with its machine and date."""

import re

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_the_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250
    first = "\n".join(lines[:40])
    assert "pip install -r requirements.txt" in first and "make demo" in first


def test_every_relative_link_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme_or_the_docs_index():
    index = (ROOT / "README.md").read_text() + (ROOT / "docs/README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"{page.name}" in index, page.name


def test_every_generated_block_names_its_machine_date_and_command():
    for page in PAGES:
        for name, body in re.findall(r"<!-- begin: (\S+) -->\n(.*?)<!-- end: \1 -->", page.read_text(), re.S):
            if not body.strip():  # not measured yet: an empty block says nothing
                continue
            assert re.match(r"(Measured on .+, \d{4}-\d{2}-\d{2}, by `[^`]+`|Computed by `[^`]+` \(\d{4}-\d{2}-\d{2}\))",
                            body), (page.name, name, body[:200])
