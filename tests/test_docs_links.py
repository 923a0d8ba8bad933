"""The docs' own links: every relative link or picture in README.md and docs/ names a file of the repository (a
commit that moves files aside for a device call and then commits with -a drops them silently)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def relative_targets(text: str):
    """The link targets of a markdown text that name a file here: no scheme, no bare anchor, the anchor cut off."""
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


def test_relative_targets_skips_urls_and_anchors():
    text = "![a](images/a.png) [b](https://x.org/b.png) [c](#part) [d](../README.md#top) [e](mailto:x@y.z)"
    assert list(relative_targets(text)) == ["images/a.png", "../README.md"]


def test_every_relative_link_in_the_docs_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    missing = [f"{page.relative_to(ROOT)} -> {target}" for page in pages
               for target in relative_targets(page.read_text())
               if not (page.parent / target).exists()]
    assert len(pages) > 5
    assert missing == [], "restore the files or fix the links: " + "; ".join(missing)
