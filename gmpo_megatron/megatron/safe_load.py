"""Loading a checkpoint never runs code from it: every pickle on a load path is restricted.

A torch_dist checkpoint holds three kinds of pickles, and stock torch / megatron-core read two of
them with plain ``pickle``, which runs whatever a crafted file asks for (``os.system``, ...):

- ``.metadata`` (DCP's index): ``FileSystemReader.read_metadata`` calls ``pickle.load``. Here it
  goes through ``MetadataUnpickler``, which admits only the classes a DCP metadata file is made of
  (``METADATA_GLOBALS``: the ``torch.distributed.checkpoint`` metadata / save-plan dataclasses and
  enums, ``torch.Size``, dtypes and layouts). The set was read off torch 2.13's
  ``metadata.py`` / ``planner.py`` / ``filesystem.py`` and checked against real checkpoints: the
  trainer's (DistributedOptimizer and plain optimizer) and both converters' outputs
  (``tests/megatron/test_safe_load.py``).
- byte entries in the ``.distcp`` files (``BytesStorageMetadata``: module ``_extra_state``,
  non-tensor optimizer state): DCP's ``DefaultLoadPlanner.load_bytes`` calls
  ``torch.load(weights_only=False)``. Here it is ``torch.load(weights_only=True)``: torch's own
  restricted unpickler, plus the classes megatron-core registers with ``add_safe_globals``.
- ``common.pt`` (megatron's non-sharded state): megatron calls ``torch.load`` without
  ``weights_only``, which is restricted by default but unrestricted when the environment sets
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``. Here it is always ``weights_only=True``.

``metadata.json`` and ``trainer_state.json`` are JSON. ``install()`` replaces those three entry
points in-process (torch's classes, so every reader of a torch_dist directory — megatron's
``dist_checkpointing.load``, the converters' stream reader, tests — goes through them); site-packages
are not edited. A refusal raises ``UnsafeCheckpointError`` naming the file and the refused class.
"""

from __future__ import annotations

import inspect
import os
import pickle
import re
from typing import Any, BinaryIO

import torch

METADATA_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "ChunkStorageMetadata", "TensorProperties",
        "TensorStorageMetadata", "BytesStorageMetadata", "StorageMeta", "_MEM_FORMAT_ENCODING"}),
    # megatron-core stores the save plans in the metadata (``all_local_plans``, for plan caching)
    "torch.distributed.checkpoint.planner": frozenset({
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    "torch": frozenset({"Size"}),  # + every torch.dtype, see _allowed
    "torch.serialization": frozenset({"_get_layout"}),  # how torch.layout pickles (str -> layout)
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),  # StorageMeta.checkpoint_id may be a Path
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file asked the unpickler for something a checkpoint never holds."""

    def __init__(self, path: str | None, refused: str, what: str, storage_index=None) -> None:
        self.path, self.refused, self.what, self.storage_index = path, refused, what, storage_index
        super().__init__(
            f"{path or what}: refused to unpickle {refused}. A checkpoint's {what} holds only "
            "tensor metadata and plain values, so this file is damaged or was crafted to run code; "
            "nothing from it was loaded. Load only checkpoints written by you or a source you "
            "trust (README.md, 'what is trusted input')"
        )

    def __reduce__(self):  # DCP copies exceptions between ranks
        return type(self), (self.path, self.refused, self.what, self.storage_index)

    def at(self, path: str) -> "UnsafeCheckpointError":
        return UnsafeCheckpointError(path, self.refused, self.what)


def _allowed(module: str, name: str) -> bool:
    if name in METADATA_GLOBALS.get(module, ()):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


class MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only ``METADATA_GLOBALS`` (and torch dtypes)."""

    def __init__(self, file: BinaryIO, path: str) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if not _allowed(module, name):
            raise UnsafeCheckpointError(self.path, f"{module}.{name}", "DCP .metadata")
        return super().find_class(module, name)


def load_dcp_metadata(file: BinaryIO, path: str):
    """The ``Metadata`` pickled in ``file`` (a DCP ``.metadata``), with restricted globals."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        metadata = MetadataUnpickler(file, path).load()
    except UnsafeCheckpointError:
        raise
    except Exception as error:  # truncated or not a pickle at all
        raise ValueError(f"{path}: not a readable DCP metadata file ({type(error).__name__}: "
                         f"{error}); the checkpoint is damaged") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(path, f"a {type(metadata).__name__} at the top level",
                                    "DCP .metadata")
    return metadata


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def torch_load_restricted(source, path: str | None, what: str, storage_index=None):
    """``torch.load(weights_only=True)`` on CPU, a refusal named by file and class."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _GLOBAL.search(str(error))
        refused = found.group(1) if found else str(error).strip().splitlines()[-1]
        raise UnsafeCheckpointError(path, refused, what, storage_index) from None


# -- the patched entry points ------------------------------------------------------------------

def _read_metadata(self, *args: Any, **kwargs: Any):
    """``FileSystemReader.read_metadata`` (torch 2.13) with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import StorageMeta

    path = self._get_metadata_path(kwargs.get("rank"))
    with self.fs.create_stream(path, "rb") as metadata_file:
        metadata = load_dcp_metadata(metadata_file, str(path))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


def _load_bytes(self, read_item, value) -> None:
    """``DefaultLoadPlanner.load_bytes`` (torch 2.13) with ``weights_only=True``."""
    from torch.distributed.checkpoint._traverse import set_element

    fqn = read_item.dest_index.fqn
    loaded = torch_load_restricted(value, None, f"byte entry {fqn!r}", read_item.storage_index)
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[fqn], loaded)
    else:
        self.state_dict[fqn] = loaded


def _read_data_naming_files(original):
    def read_data(self, plan, planner):
        try:
            return original(self, plan, planner)
        except UnsafeCheckpointError as error:
            info = self.storage_data.get(error.storage_index) if error.path is None else None
            if info is None:
                raise
            raise error.at(os.path.join(str(self.path), info.relative_path)) from None
    read_data._gmpo_safe = True
    return read_data


def _load_common(self, checkpoint_dir):
    """megatron-core's ``TorchCommonLoadStrategy.load_common`` with ``weights_only=True``."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

    path = os.path.join(str(checkpoint_dir), COMMON_STATE_FNAME)
    if not os.path.isfile(path):
        raise CheckpointingException(f"Common file {path} does not exist")
    return torch_load_restricted(path, path, "common.pt (megatron's non-sharded state)")


def _expect(function, text: str) -> None:
    """Each replacement mirrors the installed method; refuse to replace one that changed."""
    if text not in inspect.getsource(function):
        raise RuntimeError(
            f"{function.__qualname__} no longer contains {text!r} (torch {torch.__version__}): "
            "gmpo_megatron/megatron/safe_load.py mirrors torch 2.13; check its replacement "
            "against this version before loading checkpoints"
        )


def install() -> None:
    """Route torch's DCP readers through the restricted loaders (idempotent)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader

    if getattr(FileSystemReader.read_data, "_gmpo_safe", False):
        return
    _expect(FileSystemReader.read_metadata, "pickle.load(metadata_file)")
    _expect(DefaultLoadPlanner.load_bytes, "torch.load(")
    FileSystemReader.read_metadata = _read_metadata
    DefaultLoadPlanner.load_bytes = _load_bytes
    FileSystemReader.read_data = _read_data_naming_files(FileSystemReader.read_data)


def install_megatron() -> None:
    """``install()`` plus megatron-core's ``common.pt`` loader (idempotent)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    install()
    if TorchCommonLoadStrategy.load_common is not _load_common:
        _expect(TorchCommonLoadStrategy.load_common, "torch.load(load_path, map_location='cpu')")
        TorchCommonLoadStrategy.load_common = _load_common


def dist_checkpointing_load(sharded_state_dict, directory: str):
    """``megatron.core.dist_checkpointing.load`` through the restricted loaders.

    DCP turns a reader's exception into a ``CheckpointException`` (a BaseException carrying every
    rank's traceback) or, for ``.metadata`` read on one rank, into an AssertionError quoting it; so
    ``.metadata`` is read here first (a refusal is then itself, one line), and a refusal inside
    the load is unwrapped."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.api import CheckpointException

    install_megatron()
    FileSystemReader(str(directory)).read_metadata()
    try:
        return dist_checkpointing.load(sharded_state_dict, str(directory))
    except CheckpointException as error:
        for failure, _ in error.failures.values():
            if isinstance(failure, UnsafeCheckpointError):
                raise failure from None
        raise
