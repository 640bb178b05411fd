#!/usr/bin/env python3
"""Check or apply the patch files in this folder to the installed upstream packages.

    python patches/apply.py --check   # report the state of every patch (exit 0; CI runs this)
    python patches/apply.py --apply   # apply the missing ones (the GPU Dockerfile runs this)

Every patch has a runtime workaround in gmpo_megatron, so the package works unpatched; applying the
patch makes the fix visible to code outside gmpo_megatron too. A patch only applies to the exact
upstream version in its file name; a different installed version is reported and left alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# patch file -> (distribution, version, a line that is present once the patch is applied)
PATCHES = {
    "megatron-core-0.16.1-te_general_gemm.patch": ("megatron-core", "0.16.1", "    te_general_gemm = None"),
    "megatron-core-0.16.1-torch-adam-step-restore.patch": (
        "megatron-core", "0.16.1", 'if key == "step" and key not in tensors:'),
    "megatron-core-0.16.1-checkpoint-without-output-fp8.patch": (
        "megatron-core", "0.16.1", "self.fp8 = HAVE_TE and fp8 is not None"),
}


def site_root(distribution: str) -> Path:
    top = {"megatron-core": "megatron"}[distribution]
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{distribution} is not installed")
    return Path(list(spec.submodule_search_locations)[0]).parent


def target_file(patch: Path) -> str:
    for line in patch.read_text().splitlines():
        if line.startswith("+++ b/"):
            return line[len("+++ b/"):].strip()
    raise SystemExit(f"{patch.name}: no '+++ b/<path>' header")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true")
    mode.add_argument("--apply", action="store_true")
    args = parser.parse_args(argv)
    failed = False
    for name, (distribution, version, marker) in PATCHES.items():
        patch = HERE / name
        installed = importlib.metadata.version(distribution)
        if installed != version:
            print(f"{name}: {distribution} {installed} installed, patch is for {version}: skipped")
            continue
        root = site_root(distribution)
        path = root / target_file(patch)
        applied = marker in path.read_text()
        if applied:
            print(f"{name}: applied ({path})")
        elif args.check:
            print(f"{name}: not applied; gmpo_megatron applies the runtime workaround")
        else:
            result = subprocess.run(["patch", "-p1", "--forward", "-d", str(root), "-i", str(patch)],
                                    capture_output=True, text=True)
            print(f"{name}: {'applied now' if result.returncode == 0 else 'FAILED'}\n{result.stdout}{result.stderr}")
            failed |= result.returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
