"""HF <-> Megatron converters: ``python tools/convert/convert.py <command> ...``.

Same as the ``gmpo-convert`` console script; under torchrun:
``torchrun --nproc_per_node 2 tools/convert/convert.py hf-to-megatron --tp 2 ...``.
See docs/convert.md.
"""

import sys

from gmpo_megatron.convert.cli import main

if __name__ == "__main__":  # dist_checkpointing saves spawn processes: keep the guard
    sys.exit(main())
