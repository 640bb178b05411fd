"""The README's commands work when run in the order the README gives them."""

import re
import shlex
from pathlib import Path

from gmpo_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _train_commands(readme: str) -> list[list[str]]:
    """Every gmpo-train / torchrun ... gmpo_megatron.cli command in the README's bash blocks."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        for line in block.splitlines():
            line = line.split(" # ")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and (words[0] == "gmpo-train" or "gmpo_megatron.cli" in words):
                    commands.append(words)
    return commands


def test_each_new_run_in_the_readme_has_its_own_output_dir():
    """A second run into an output_dir that holds a run is refused (only --resume continues one),
    so each command that starts a run must name a fresh output_dir."""
    commands = _train_commands((REPO / "README.md").read_text())
    assert len(commands) >= 3
    seen = {}
    for words in commands:
        config = words[words.index("--config") + 1]
        overrides = [w for w in words if "=" in w and not w.startswith("-")]
        output_dir = load_config(REPO / config, overrides).output_dir
        if "--resume" in words:
            assert output_dir in seen, f"{' '.join(words)} resumes a run the README never started"
            continue
        assert output_dir not in seen, (f"{' '.join(words)} reuses output_dir={output_dir} of "
                                        f"{seen.get(output_dir)}: give it its own output_dir=")
        seen[output_dir] = " ".join(words)
