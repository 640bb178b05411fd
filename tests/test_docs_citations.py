"""The package cites only documents that are in the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_markdown_file_the_package_cites_exists():
    missing = []
    for path in sorted((REPO / "gmpo_megatron").rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for cited in re.findall(r"[\w./-]*\w\.md\b", line):
                if not any((base / cited).is_file() for base in (REPO, REPO / "docs", path.parent)):
                    missing.append(f"{path.relative_to(REPO)}:{number}: {cited}")
    assert not missing, "cites a file that is not in the repo (cite the paper, docs/ or the code):\n" + "\n".join(missing)
