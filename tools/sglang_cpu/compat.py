"""Source fixes that let sglang 0.5.21 serve on a CPU-only torch, applied to the SGLang server's
own virtualenv (never the trainer's). Each fix is documented in ``patches/README.md``.

Run with the server venv's interpreter::

    .venv-sglang/bin/python tools/sglang_cpu/compat.py --apply   # apply (idempotent)
    .venv-sglang/bin/python tools/sglang_cpu/compat.py --check   # verify, change nothing

Every fix names the distribution and version it was written for and the exact text it replaces;
another version, or a file whose text differs, stops with an error instead of patching blindly.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SourceFix:
    name: str
    distribution: str
    version: str
    module: str  # the module whose file is edited
    old: str
    new: str
    why: str

    def path(self) -> Path:
        spec = importlib.util.find_spec(self.module.rsplit(".", 1)[0])
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"{self.name}: package of {self.module} is not installed")
        package_dir = Path(list(spec.submodule_search_locations)[0])
        return package_dir / (self.module.rsplit(".", 1)[1] + ".py")


_NO_OPS_FAKE = '(torch.library.register_fake("torchvision::{op}") if torchvision.extension._has_ops() else (lambda fn: fn))'

FIXES = [
    SourceFix(
        name="torchvision-fake-nms",
        distribution="torchvision", version="0.28.0", module="torchvision._meta_registrations",
        old='@torch.library.register_fake("torchvision::nms")\n',
        new="@" + _NO_OPS_FAKE.format(op="nms") + "\n",
        why="PyPI's torchvision 0.28.0 is a CUDA build whose C++ ops cannot load beside the CPU torch; "
            "registering a fake for the missing torchvision::nms op raises at import",
    ),
    SourceFix(
        name="torchvision-fake-qnms",
        distribution="torchvision", version="0.28.0", module="torchvision._meta_registrations",
        old='@torch.library.register_fake("torchvision::qnms")\n',
        new="@" + _NO_OPS_FAKE.format(op="qnms") + "\n",
        why="same as torchvision-fake-nms, for torchvision::qnms",
    ),
    SourceFix(
        name="sglang-routed-experts-pin-memory",
        distribution="sglang", version="0.5.21", module="sglang.srt.state_capturer.base",
        old='            device="cpu",\n            pin_memory=True,\n',
        new='            device="cpu",\n            pin_memory=torch.device(device).type != "cpu",\n',
        why="--enable-return-routed-experts allocates its host buffer with pin_memory=True, which "
            "ends in cudaHostRegister; a CPU server has nothing to pin for",
    ),
]

STANDIN = ("gmpo-sgl-kernel-cpu-standin", "0.5.21")


def _check_versions() -> list[str]:
    errors = []
    wanted = {(f.distribution, f.version) for f in FIXES} | {("sglang", STANDIN[1]), STANDIN}
    for dist, version in sorted(wanted):
        try:
            found = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            errors.append(f"{dist}=={version} is not installed in {sys.prefix}")
            continue
        if found != version:
            errors.append(f"{dist} is {found}, these fixes are for {version} only: install "
                          f"{dist}=={version} (tools/sglang_cpu/setup.sh) or rewrite the fix")
    return errors


def run(apply: bool) -> int:
    errors = _check_versions()
    if errors:
        for line in errors:
            print(f"sglang_cpu compat: {line}", file=sys.stderr)
        return 1
    status = 0
    for fix in FIXES:
        path = fix.path()
        text = path.read_text()
        if fix.new in text and fix.old not in text:
            print(f"{fix.name}: applied ({path})")
            continue
        if text.count(fix.old) != 1:
            print(f"sglang_cpu compat: {fix.name}: expected the text once in {path}, found it "
                  f"{text.count(fix.old)} times: the file differs from {fix.distribution} "
                  f"{fix.version}", file=sys.stderr)
            status = 1
            continue
        if not apply:
            print(f"sglang_cpu compat: {fix.name}: not applied ({path}); run --apply", file=sys.stderr)
            status = 1
            continue
        path.write_text(text.replace(fix.old, fix.new))
        for cached in path.parent.glob(f"__pycache__/{path.stem}.*.pyc"):
            cached.unlink()
        print(f"{fix.name}: applied now ({path})")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--apply", action="store_true")
    mode.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    return run(apply=args.apply)


if __name__ == "__main__":
    sys.exit(main())
