"""Bucket plans and the flat-buffer layout of weight_sync=distributed (pure, no server)."""

import importlib.util
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gmpo_megatron.rollout.weight_buckets import (
    WeightSpec,
    bucket_nbytes,
    bucket_offsets,
    dtype_name,
    flatten_bucket,
    is_expert_name,
    plan_buckets,
    unflatten_bucket,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int64, torch.bool]


@st.composite
def stage_specs(draw, max_tensors=40):
    """A random stage: names unique, experts and non-experts interleaved as Megatron streams them."""
    count = draw(st.integers(0, max_tensors))
    specs = []
    for i in range(count):
        expert = draw(st.booleans())
        name = (f"model.layers.{i}.mlp.experts.{draw(st.integers(0, 63))}.up_proj.weight" if expert
                else f"model.layers.{i}.self_attn.{draw(st.sampled_from(['q_proj', 'k_norm']))}.weight")
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
        specs.append(WeightSpec(name, shape, draw(st.sampled_from(DTYPES))))
    return specs


def random_tensor(spec: WeightSpec, generator: torch.Generator) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs, infinities, denormals included): the copy must be bit-exact."""
    raw = torch.randint(0, 256, (spec.nbytes,), dtype=torch.uint8, generator=generator)
    if spec.dtype == torch.bool:
        raw = raw % 2
    return raw.view(spec.dtype).reshape(spec.shape)


@settings(max_examples=300, deadline=None)
@given(specs=stage_specs(), bucket_bytes=st.integers(1, 2000))
def test_plan_respects_the_bound_keeps_order_and_sends_every_tensor_once(specs, bucket_bytes):
    buckets = plan_buckets(specs, bucket_bytes)
    flat = [spec for bucket in buckets for spec in bucket]
    assert sorted(map(id, flat)) == sorted(map(id, specs)), "every tensor exactly once"
    # non-expert pass, then expert pass, each in stream order (stable)
    assert flat == [s for s in specs if not s.is_expert] + [s for s in specs if s.is_expert]
    for bucket in buckets:
        assert bucket, "no empty bucket"
        assert len({s.is_expert for s in bucket}) == 1, "a bucket never mixes the passes"
        assert bucket_nbytes(bucket) <= bucket_bytes or len(bucket) == 1, "only a lone tensor exceeds the bound"
        for spec, (start, _) in zip(bucket, bucket_offsets(bucket)):
            assert start % spec.dtype.itemsize == 0, "SGLang views each tensor in place: offsets aligned"
    seen_expert = False
    for bucket in buckets:
        seen_expert |= bucket[0].is_expert
        assert bucket[0].is_expert or not seen_expert, "an expert bucket came before a non-expert one"


@settings(max_examples=200, deadline=None)
@given(specs=stage_specs(max_tensors=12), bucket_bytes=st.integers(1, 600), seed=st.integers(0, 2**31))
def test_flatten_then_unflatten_is_bit_exact(specs, bucket_bytes, seed):
    generator = torch.Generator().manual_seed(seed)
    for bucket in plan_buckets(specs, bucket_bytes):
        tensors = [random_tensor(spec, generator) for spec in bucket]
        buffer = flatten_bucket(bucket, tensors)
        assert buffer.dtype == torch.uint8 and buffer.shape == (bucket_nbytes(bucket),)
        back = unflatten_bucket(buffer, bucket)
        for spec, original, restored in zip(bucket, tensors, back):
            assert restored.dtype == spec.dtype and tuple(restored.shape) == spec.shape
            assert torch.equal(original.reshape(-1).view(torch.uint8), restored.reshape(-1).view(torch.uint8))


def test_a_tensor_larger_than_the_bucket_travels_alone():
    small = WeightSpec("model.norm.weight", (4,), torch.float32)  # 16 bytes
    big = WeightSpec("model.embed_tokens.weight", (100, 10), torch.float32)  # 4000 bytes
    assert plan_buckets([small, big, small], 64) == [[small], [big], [small]]
    assert plan_buckets([small, small, small, small, small], 32) == [[small, small], [small, small], [small]]


def test_expert_names_and_dtype_spelling():
    assert is_expert_name("model.layers.3.mlp.experts.17.up_proj.weight")
    for name in ("model.layers.3.mlp.gate.weight", "model.layers.3.mlp.shared_expert.up_proj.weight",
                 "model.layers.3.mlp.shared_expert_gate.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert not is_expert_name(name), name
    assert [dtype_name(d) for d in (torch.float32, torch.bfloat16)] == ["float32", "bfloat16"]
    assert all(getattr(torch, dtype_name(d)) is d for d in DTYPES)  # how SGLang resolves them


def test_mismatched_tensors_are_refused_with_the_name():
    spec = WeightSpec("model.norm.weight", (4,), torch.float32)
    with pytest.raises(ValueError, match=r"model\.norm\.weight is torch\.bfloat16 \(4,\)"):
        flatten_bucket([spec], [torch.zeros(4, dtype=torch.bfloat16)])
    with pytest.raises(ValueError, match="1 tensors for a bucket of 2"):
        flatten_bucket([spec, spec], [torch.zeros(4)])
    with pytest.raises(ValueError, match="uint8"):
        unflatten_bucket(torch.zeros(16, dtype=torch.uint8)[:15], [spec])


def _sglang_tensor_bucket():
    """SGLang's own FlattenedTensorBucket, loaded from the server environment's source file
    (it imports only torch), so the layout is checked against the receiver's code."""
    site = Path(__file__).resolve().parents[2] / ".venv-sglang" / "lib"
    files = sorted(site.glob("python3*/site-packages/sglang/srt/weight_sync/tensor_bucket.py"))
    if not files:
        pytest.skip("no SGLang server environment (.venv-sglang): tools/sglang_cpu/setup.sh builds it")
    spec = importlib.util.spec_from_file_location("sglang_tensor_bucket", files[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FlattenedTensorBucket


def test_flat_buffer_is_what_sglangs_receiver_rebuilds():
    """The receiver allocates the named tensors, flattens them into its own buffer, broadcasts
    into that buffer and rebuilds: our buffer must be byte-identical in its layout."""
    bucket_class = _sglang_tensor_bucket()
    generator = torch.Generator().manual_seed(0)
    specs = [WeightSpec("a", (3, 5), torch.bfloat16), WeightSpec("b", (7,), torch.float16),
             WeightSpec("c", (2, 2), torch.float32), WeightSpec("d", (), torch.float32),
             WeightSpec("model.layers.0.mlp.experts.1.up_proj.weight", (4, 3), torch.float32)]
    for bucket in plan_buckets(specs, 10_000):
        tensors = [random_tensor(s, generator) for s in bucket]
        ours = flatten_bucket(bucket, tensors)
        receiver = bucket_class(named_tensors=[(s.name, torch.empty(s.shape, dtype=s.dtype)) for s in bucket])
        flat = receiver.get_flattened_tensor()
        assert flat.dtype == ours.dtype and flat.shape == ours.shape
        flat.copy_(ours)  # what the broadcast does
        for (name, restored), spec, original in zip(receiver.reconstruct_tensors(), bucket, tensors):
            assert name == spec.name and restored.dtype == spec.dtype and tuple(restored.shape) == spec.shape
            assert torch.equal(restored.reshape(-1).view(torch.uint8), original.reshape(-1).view(torch.uint8))
