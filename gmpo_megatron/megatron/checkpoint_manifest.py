"""``MANIFEST.json``: the size and SHA-256 of every file of a checkpoint.

Written at save before ``COMPLETE`` and checked at load, so a truncated ``.distcp``, a scrambled
byte inside a tensor or a missing file is named before anything is read from it (torch checks no
checksum on load). Files are hashed in 4 MiB blocks, streamed (memory stays flat whatever the
file size); right after a save they are still in the page cache. SHA-256 rather than BLAKE2b:
with the CPU's SHA instructions it ran at ~650 MiB/s here, BLAKE2b at ~240 MiB/s and a plain read
of the same cached file at ~530 MiB/s (2 shared cores, under load). Under torch.distributed each
rank hashes its share of the files (``shard``), so the cost per rank falls with the world size.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

MANIFEST = "MANIFEST.json"
BLOCK_BYTES = 4 << 20
UNLISTED = frozenset({MANIFEST, "COMPLETE"})  # written after the manifest


def file_digest(path: str | Path) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file, read in ``BLOCK_BYTES`` blocks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(BLOCK_BYTES)
        view = memoryview(buffer)
        while True:
            n = f.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
            size += n
    return {"size": size, "sha256": digest.hexdigest()}


def listed_files(directory: str | Path) -> list[str]:
    """The files a manifest covers: every regular file of the directory tree, relative, sorted."""
    directory = Path(directory)
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and str(p.relative_to(directory)) not in UNLISTED)


def shard(names: list[str], rank: int, world_size: int) -> list[str]:
    """The files this rank hashes (round robin over the sorted list)."""
    return names[rank::world_size]


def digests(directory: str | Path, names: list[str]) -> dict[str, dict]:
    return {name: file_digest(Path(directory) / name) for name in names}


def write_manifest(directory: str | Path, files: dict[str, dict]) -> Path:
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump({"algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def rewrite_manifest(directory: str | Path) -> Path:
    """Recompute the whole manifest in this process (tests, or after repairing a checkpoint)."""
    return write_manifest(directory, digests(directory, listed_files(directory)))


def read_manifest(directory: str | Path) -> dict[str, dict] | None:
    """The listed files, or None when the checkpoint has no manifest (written before manifests).
    Raises ValueError naming the file when it is unreadable."""
    path = Path(directory) / MANIFEST
    if not path.exists():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        assert isinstance(files, dict)
    except (ValueError, KeyError, TypeError, AssertionError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {error})") from None
    return files


def problems(directory: str | Path, expected: dict[str, dict], names: list[str]) -> list[str]:
    """What is wrong with ``names`` (a share of the manifest's files): missing, wrong size, wrong
    digest. Each problem names the file."""
    found = []
    for name in names:
        path = Path(directory) / name
        want = expected[name]
        if not path.is_file():
            found.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            found.append(f"{path} has {size} bytes, the manifest says {want['size']} (truncated "
                         "or overwritten)")
        elif file_digest(path)["sha256"] != want.get("sha256"):
            found.append(f"{path} does not match its checksum in {MANIFEST} (its bytes changed)")
    return found
