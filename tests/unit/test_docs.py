"""The README is a front page (the two commands, the real job, the commands table, what is measured and
where it comes from, links); the rest lives in docs/ by topic. Every relative link resolves."""
from __future__ import annotations

import re

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)#\s]+)(#[^)]*)?\)")


def test_the_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 120
    for command in ("make demo ", "make demo MODEL=qwen3", "make demo MODEL=smollm2", "make test ",
                    "python -m lowvram_ft train --model unsloth/gpt-oss-20b"):
        assert command in text, command
    assert "## Measured so far" in text and "| what | figure | where it comes from |" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    for target, _ in LINK.findall(page.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        assert (page.parent / target).exists(), f"{page.name}: {target}"
