"""The docs hold together: no citation of files outside the repository, every relative link resolves,
and the CLI reference is what the commands say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


MD_NAME = re.compile(r"\b[\w.-]+\.md\b")
UP_PATH = re.compile(r"(?:\.\./)+[\w.-]+")


def test_no_doc_cites_files_outside_the_repository():
    """Every Markdown file a doc names is one the repository has, and every path that climbs up a
    directory names something inside the repository."""
    have = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        bad += [f"{doc.name}: {m}" for m in MD_NAME.findall(text) if m not in have]
        bad += [f"{doc.name}: {m}" for m in UP_PATH.findall(text)
                if not ((doc.parent / m).resolve().is_relative_to(ROOT) and (doc.parent / m).exists())]
    assert not bad, bad


def test_every_relative_link_resolves():
    bad = []
    for doc in DOCS:
        for target in LINK.findall(doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = target.split("#", 1)[0]
            if path and not (doc.parent / path).exists():
                bad.append(f"{doc.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_cli_reference_is_up_to_date():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_cli_docs.py"), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
