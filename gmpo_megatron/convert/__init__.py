"""HF <-> Megatron converters for Qwen2.5, Qwen3 and Qwen3-MoE (``gmpo-convert``; docs/convert.md).

Public pieces other code reuses:

- ``open_hf_checkpoint(dir)`` (``hf_io``): lazy reader of HF safetensors (single file, sharded,
  transformers-5 fused experts) with ``.keys()`` and ``.read(name)`` — feed ``ckpt.read`` to
  ``gmpo_megatron.megatron.weights.load_hf_weights`` to initialise a model from an HF directory.
- ``checkpoint_info`` / ``load_megatron_model`` (``megatron_ckpt``): the HF config stored in a
  converted Megatron checkpoint, and loading it into a model built at any layout.
- ``convert_hf_to_megatron``, ``convert_megatron_to_hf``, ``verify_logits``, ``verify_weights``.

Every refusal raises ``ConversionError`` naming the offending tensor, field or path.
"""

from gmpo_megatron.convert.errors import ConversionError
from gmpo_megatron.convert.hf_io import HFCheckpoint, open_hf_checkpoint

__all__ = ["ConversionError", "HFCheckpoint", "open_hf_checkpoint"]
