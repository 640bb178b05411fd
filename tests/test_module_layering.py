"""Layering: ``gmpo_megatron.models`` (HF-config facts and HF <-> Megatron name mappings) never
depends on ``gmpo_megatron.megatron`` or megatron-core; the Megatron side depends on models."""

import subprocess
import sys

CODE = """
import sys
from gmpo_megatron.models import get_mapping
from gmpo_megatron.models.presets import tiny_qwen3_moe

mapping = get_mapping(tiny_qwen3_moe())
[mapping.is_moe_layer(i) for i in range(mapping.config.num_hidden_layers)]
mapping.hf_names()
print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron' or m.startswith('gmpo_megatron.megatron')))
"""


def test_importing_and_using_the_mappings_imports_no_megatron_module():
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]", result.stdout
