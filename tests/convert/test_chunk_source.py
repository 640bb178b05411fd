"""HFChunkSource: a stored chunk as byte ranges of the HF files, exactly the mapping's rows."""

from __future__ import annotations

import os

import pytest
import torch
from convert_helpers import make_model, save_model
from transformers import AutoConfig

from gmpo_megatron.convert.hf_io import open_hf_checkpoint
from gmpo_megatron.convert.raw_io import tensor_bytes
from gmpo_megatron.convert.torch_dist_writer import HFChunkSource
from gmpo_megatron.models import get_mapping


def read_ranges(ranges) -> bytes:
    out = b""
    for piece in ranges:
        with open(piece.path, "rb") as f:
            f.seek(piece.offset)
            out += f.read(piece.nbytes)
    return out


def raw(tensor: torch.Tensor) -> bytes:
    return bytes(tensor_bytes(tensor))


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A qwen3_moe model with 3 KV groups (uneven QKV interleave), a fresh seed per run."""
    seed = int.from_bytes(os.urandom(2), "little")
    model = make_model("qwen3_moe", seed=seed, num_attention_heads=6, num_key_value_heads=3)
    return save_model(model, str(tmp_path_factory.mktemp("moe")))


CHUNKS = [  # (megatron name, row offset, rows or None for all)
    ("decoder.layers.1.self_attention.linear_qkv.weight", 0, None),
    ("decoder.layers.1.self_attention.linear_qkv.weight", 5, 40),
    ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight", 0, None),
    ("decoder.layers.0.mlp.experts.local_experts.3.linear_fc1.weight", 7, 30),
    ("decoder.layers.0.mlp.experts.local_experts.2.linear_fc2.weight", 0, None),
    ("embedding.word_embeddings.weight", 11, 50),
    ("decoder.layers.1.self_attention.q_layernorm.weight", 0, None),
]


@pytest.mark.parametrize("name,first,rows", CHUNKS)
def test_chunk_ranges_are_the_mappings_rows(moe_checkpoint, name, first, rows):
    """The byte ranges of a chunk (whole tensor or a row range of it) read back as the same bytes
    as the mapping applied to the full HF tensors, narrowed to the chunk."""
    mapping = get_mapping(AutoConfig.from_pretrained(moe_checkpoint))
    with open_hf_checkpoint(moe_checkpoint) as ckpt:
        full = mapping.to_megatron(name, [ckpt.read(h) for h in mapping.group_of(name).hf_names])
        rows = full.shape[0] - first if rows is None else rows
        expected = full.narrow(0, first, rows)
        source = HFChunkSource(mapping, ckpt)
        offsets, sizes = (first, *[0] * (full.dim() - 1)), (rows, *full.shape[1:])
        ranges = source.payload(name, tuple(full.shape), offsets, sizes, full.dtype)
        assert isinstance(ranges, list) and read_ranges(ranges) == raw(expected)
        # another dtype needs a cast: no ranges, the tensor path reads rows into place
        as_tensor = source.payload(name, tuple(full.shape), offsets, sizes, torch.bfloat16)
        assert torch.equal(as_tensor, expected.to(torch.bfloat16))
        assert torch.equal(source(name, tuple(full.shape), offsets, sizes, full.dtype), expected)
    if "linear_qkv" in name and first == 0:
        assert len(ranges) == 3 * 3  # per group: its query heads, its key head, its value head


def test_a_mapping_that_mixes_columns_is_applied_to_full_tensors(moe_checkpoint):
    """A transform that is not a row rearrangement (here a transpose) is detected by the probe:
    no ranges, and the chunk is cut from the transformed tensor."""

    class TransposedFc2(type(get_mapping(AutoConfig.from_pretrained(moe_checkpoint)))):
        def to_megatron(self, megatron_name, hf_tensors):
            if megatron_name.endswith("linear_fc2.weight"):
                return hf_tensors[0].t()
            return super().to_megatron(megatron_name, hf_tensors)

    mapping = TransposedFc2(AutoConfig.from_pretrained(moe_checkpoint))
    name = "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"
    with open_hf_checkpoint(moe_checkpoint) as ckpt:
        hf = ckpt.read(mapping.group_of(name).hf_names[0])
        assert hf.shape[0] != hf.shape[1]
        full = hf.t()
        source = HFChunkSource(mapping, ckpt)
        offsets, sizes = (2, 0), (3, full.shape[1])
        payload = source.payload(name, tuple(full.shape), offsets, sizes, full.dtype)
        assert isinstance(payload, torch.Tensor) and torch.equal(payload, full[2:5])
