"""Write ``examples/moe/configs/<preset>/config.json`` for every full-size preset.

The files are the presets of ``gmpo_megatron/models/presets.py`` (``PUBLIC_CONFIGS``) in the layout
of the models' published ``config.json``; ``model.hf_config`` can point at such a directory instead
of the preset name. ``tests/e2e/test_example_configs.py`` fails when a file and its preset differ:
after changing a preset, run

    python examples/moe/configs/write_configs.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gmpo_megatron.models.presets import PUBLIC_CONFIGS

CONFIGS_DIR = Path(__file__).resolve().parent


def render(name: str) -> str:
    """The exact text of ``<name>/config.json`` (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(PUBLIC_CONFIGS[name], indent=2, sort_keys=True) + "\n"


def main(out_dir: Path = CONFIGS_DIR) -> list[Path]:
    written = []
    for name in sorted(PUBLIC_CONFIGS):
        path = out_dir / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(name))
        written.append(path)
    return written


if __name__ == "__main__":
    for written_path in main(Path(sys.argv[1]) if len(sys.argv) > 1 else CONFIGS_DIR):
        print(written_path)
