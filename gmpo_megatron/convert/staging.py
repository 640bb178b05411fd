"""Output directories that are either complete or clearly not there.

A converter writes into ``<parent>/.<name>.gmpo-incomplete`` and, once every file is written, adds
the completion marker ``gmpo_convert.json`` (what was converted, from where, how) and renames the
directory to ``<name>`` — a single atomic ``rename`` on POSIX filesystems. A crash leaves only the
hidden ``*.gmpo-incomplete`` directory (no marker, not under the requested name), which the next run
removes. An existing output is replaced only with ``overwrite=True`` and only if it is a previous
converter output (it has the marker) or empty: we never delete a directory we did not write.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from gmpo_megatron.convert.errors import ConversionError

MARKER = "gmpo_convert.json"
FORMAT_VERSION = 1


def read_marker(directory: str) -> dict | None:
    path = os.path.join(directory, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


class StagedDir:
    """``final`` is created atomically: write into ``.path``, then ``commit(marker)``."""

    def __init__(self, final: str, overwrite: bool = False) -> None:
        self.final = os.path.abspath(final.rstrip("/"))
        parent, name = os.path.split(self.final)
        self.path = os.path.join(parent, f".{name}.gmpo-incomplete")
        self._old = os.path.join(parent, f".{name}.gmpo-replaced")
        if os.path.lexists(self.final):
            if not overwrite:
                raise ConversionError(f"output directory {self.final} already exists: choose "
                                      "another --out-dir or pass --overwrite")
            if not os.path.isdir(self.final) or (os.listdir(self.final)
                                                 and read_marker(self.final) is None):
                raise ConversionError(
                    f"--overwrite refused: {self.final} is not a gmpo-convert output (no {MARKER}); "
                    "remove it yourself if it is really meant to go"
                )
        if not os.path.isdir(parent):
            raise ConversionError(f"parent directory {parent} of the output does not exist")

    def prepare(self) -> str:
        """Create an empty staging directory (removing a crashed run's leftovers)."""
        shutil.rmtree(self.path, ignore_errors=True)
        os.makedirs(self.path)
        return self.path

    def commit(self, marker: dict) -> str:
        for root, _, files in os.walk(self.path):  # every byte durable before the marker vouches
            for name in files:
                _fsync_file(os.path.join(root, name))
        marker = {"format_version": FORMAT_VERSION,
                  "completed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **marker}
        path = os.path.join(self.path, MARKER)
        with open(path, "w") as f:
            json.dump(marker, f, indent=2, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        if os.path.lexists(self.final):
            shutil.rmtree(self._old, ignore_errors=True)
            os.rename(self.final, self._old)
        os.rename(self.path, self.final)
        _fsync_dir(os.path.dirname(self.final))
        shutil.rmtree(self._old, ignore_errors=True)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# Files that are weights or weight indexes; everything else in an HF directory (config, generation
# config, tokenizer, chat template, license, readme) travels with the model.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_model_files(src: str, dst: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the non-weight files (config, tokenizer, ...) of an HF directory; returns their names."""
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if (not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES) or name in _WEIGHT_INDEXES
                or name in skip or name == MARKER or name.startswith(".")):
            continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied
