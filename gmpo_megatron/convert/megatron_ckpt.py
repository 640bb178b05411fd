"""The Megatron checkpoint directory the converters write, and how to load it into a model.

Layout of a directory written by ``gmpo-convert hf-to-megatron``::

    M/.metadata, M/__R_T.distcp, M/common.pt, M/metadata.json   dist_checkpointing, torch_dist format
    M/hf/config.json, generation_config.json, tokenizer files     copied from the HF source
    M/gmpo_convert.json                                            completion marker (written last)

``M/hf/`` makes the checkpoint self-describing: ``megatron-to-hf``, ``verify`` and the trainer
rebuild the model from it with no extra flags. The model tensors are saved from
``model.sharded_state_dict()``, so they load at any TP / PP / EP / ETP layout:

    from gmpo_megatron.convert.megatron_ckpt import checkpoint_info, load_megatron_model
    info = checkpoint_info(M)                      # validated HF config (+ marker)
    model = build_model(info.hf_config, BuildOptions(tp=..., pp=..., ep=..., etp=...))
    load_megatron_model(model, M)                  # collective over all ranks

Checkpoints saved by the trainer (no marker, no ``hf/``) are read the same way given the HF config
directory (``hf_config_dir``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.staging import MARKER, read_marker
from gmpo_megatron.convert.validate import check_hf_config, compare_hf_configs

HF_SUBDIR = "hf"
MEGATRON_KIND = "megatron_torch_dist"
HF_KIND = "hf_safetensors"


@dataclass(frozen=True)
class MegatronCheckpointInfo:
    directory: str
    hf_config: object  # transformers PretrainedConfig
    hf_files_dir: str  # where config.json / tokenizer files are copied from
    marker: dict | None  # None for checkpoints not written by gmpo-convert (e.g. the trainer's)


def load_hf_config(directory: str):
    """The HF config in ``directory`` (its architecture's config class; AutoConfig otherwise)."""
    import json

    import transformers

    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory} has no config.json")
    with open(path) as f:
        model_type = json.load(f).get("model_type")
    classes = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "qwen3_moe": "Qwen3MoeConfig"}
    # The specific class avoids AutoConfig's import of every architecture (~0.2 s).
    cls = getattr(transformers, classes[model_type]) if model_type in classes else (
        transformers.AutoConfig)
    return cls.from_pretrained(directory, local_files_only=True)


def checkpoint_info(megatron_dir: str, hf_config_dir: str | None = None) -> MegatronCheckpointInfo:
    """The HF config of a Megatron checkpoint, validated; refuses incomplete or ambiguous dirs."""
    directory = os.path.abspath(megatron_dir)
    if not os.path.isdir(directory):
        raise ConversionError(f"Megatron checkpoint directory {directory} does not exist")
    marker = read_marker(directory)
    stored = os.path.join(directory, HF_SUBDIR)
    if marker is None and os.path.isdir(stored):
        raise ConversionError(f"{directory} has {HF_SUBDIR}/ but no {MARKER}: it is an unfinished "
                              "conversion; convert again")
    if marker is not None and marker.get("kind") != MEGATRON_KIND:
        raise ConversionError(f"{directory} is a {marker.get('kind')!r} output, not a Megatron "
                              "checkpoint")
    configs = []
    if marker is not None:
        configs.append((load_hf_config(stored), f"the config stored in {stored}", stored))
    if hf_config_dir is not None:
        hf_config_dir = os.path.abspath(hf_config_dir)
        configs.append((load_hf_config(hf_config_dir), f"--hf-config-dir {hf_config_dir}",
                        hf_config_dir))
    if not configs:
        raise ConversionError(f"{directory} carries no HF config (no {HF_SUBDIR}/; not written by "
                              "gmpo-convert): pass --hf-config-dir with the model's config.json")
    if len(configs) == 2:
        compare_hf_configs(configs[0][0], configs[1][0], configs[0][1], configs[1][1])
    hf_config, _, files_dir = configs[-1]
    check_hf_config(hf_config)
    return MegatronCheckpointInfo(directory, hf_config, files_dir, marker)


def converter_build_options(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None,
                            params_dtype: torch.dtype = torch.float32):
    """BuildOptions for a model whose every weight is about to be overwritten from a checkpoint.

    Megatron's random initialisation is skipped: on CPU it costs ~3 s per GB of parameters (minutes
    for a 30B model) for values that are thrown away. The tensor-parallel tags it would set are not
    needed here: dist_checkpointing shards by layer type, and ``weights.shard_info`` falls back to
    the layer type too."""
    from gmpo_megatron.megatron.model_builder import BuildOptions

    return BuildOptions(tp=tp, pp=pp, ep=ep, etp=etp, params_dtype=params_dtype,
                        extra={"perform_initialization": False})


def save_megatron_model(model_chunks, directory: str) -> None:
    """Save this rank's shards into ``directory`` (empty, existing). Collective over all ranks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    from gmpo_megatron.megatron.save_processes import writers_die_with_parent

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise ConversionError("virtual pipeline stages (several model chunks) are not supported")
    # torch.save computes a CRC32 of every record, which halves the write speed, yet torch.load
    # never checks it (a flipped byte loads silently either way): skip it for this save only.
    # The forked writer processes inherit the setting.
    crc32 = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        with writers_die_with_parent():  # the forked writer processes end with this one
            dist_checkpointing.save(chunks[0].sharded_state_dict(), directory,
                                    sharded_strategy=TorchDistSaveShardedStrategy("torch_dist", 1))
    finally:
        torch.serialization.set_crc32_options(crc32)


def load_megatron_model(model_chunks, directory: str) -> None:
    """Fill the model's shards from a torch_dist checkpoint saved at any layout (collective).

    Stored dtypes are cast to the model's (a bf16 checkpoint loads into an fp32 model). Its
    pickles go through the restricted loaders of ``safe_load``."""
    from gmpo_megatron.megatron.safe_load import UnsafeCheckpointError, dist_checkpointing_load

    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if len(chunks) != 1:
        raise ConversionError("virtual pipeline stages (several model chunks) are not supported")
    request = chunks[0].sharded_state_dict()
    try:
        loaded = dist_checkpointing_load(request, directory)
    except UnsafeCheckpointError as error:
        raise ConversionError(str(error)) from None
    # A trainer checkpoint also holds the optimizer: its common (non-tensor) entries come back
    # from common.pt under their own top-level key, which the model never asked for.
    loaded = {key: value for key, value in loaded.items() if key in request}
    # Factories (the fc1 [gate; up] halves) are merged into new tensors: copy them all back.
    chunks[0].load_state_dict(loaded, strict=True)


def stored_dtype(reader) -> torch.dtype:
    """The dtype of the checkpoint's parameters (the embedding's; routers may differ)."""
    for name, tensor in reader.tensors.items():
        if name == "embedding.word_embeddings.weight":
            return tensor.dtype
    return next(iter(reader.tensors.values())).dtype
