"""The embedded rollout engine: a transformers causal LM in this process, with its own sampling loop.

Used for the CPU path (tests, the tiny demo) and as the reference the SGLang engine is checked
against. One batch holds every sample of every prompt (chunked by `max_batch_size`), left-padded,
with an attention mask, explicit position ids and a KV cache.

Reproducibility: every sample draws its randomness from its own `torch.Generator`, seeded from
(seed, prompt index, sample index), so a sample does not depend on which other samples share its
batch or chunk. Sampling is an exponential race (`argmax(probs / Exp(1) noise)`), which draws
exactly from `probs`.

Weights: the engine speaks HF *checkpoint* names (what `save_pretrained` writes and what the
trainer's weight sync sends), per expert for MoE. transformers 5 keeps Qwen3-MoE experts fused
in memory, per layer:

    mlp.experts.gate_up_proj  [E, 2I, H]  = stack_e cat([experts.e.gate_proj.weight [I, H],
                                                          experts.e.up_proj.weight   [I, H]], dim 0)
    mlp.experts.down_proj     [E, H, I]   = stack_e experts.e.down_proj.weight [H, I]

(the forward is `gate, up = linear(x, gate_up_proj[e]).chunk(2)`), so each per-expert tensor is
a slice of a fused parameter here.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from gmpo_megatron.rollout.engine import (
    DiskWeights,
    EngineHealth,
    GenerationAborted,
    Rollout,
    SamplingParams,
    WeightSource,
)


@dataclass(frozen=True)
class _CheckpointSlot:
    """Where one HF-checkpoint tensor lives in the live model: `tensor[index]` (or all of it)."""

    tensor: torch.Tensor
    index: tuple | None = None

    def view(self) -> torch.Tensor:
        return self.tensor.data if self.index is None else self.tensor.data[self.index]


class EmbeddedEngine:
    """A `RolloutEngine` running `AutoModelForCausalLM.from_config(hf_config)` in eval mode.

    The model starts from random weights (seeded by `init_seed`, without touching the global
    RNG); load real ones with `update_weights`. `pad_token_id` fills left padding and the slots of
    finished rows; it is never attended to. `experts_implementation` (MoE only) is transformers'
    choice ("grouped_mm", "batched_mm", "eager"); by default transformers picks, except that
    "eager" is used where torch's grouped_mm cannot run (see `_default_experts_implementation`).
    """

    weight_transports = ("tensors", "disk")

    def __init__(
        self,
        hf_config: transformers.PretrainedConfig,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        pad_token_id: int,
        max_batch_size: int = 64,
        init_seed: int = 0,
        attn_implementation: str = "sdpa",
        experts_implementation: str | None = None,
    ):
        if not isinstance(hf_config, transformers.PretrainedConfig):
            raise TypeError(f"hf_config must be a transformers.PretrainedConfig, got {type(hf_config).__name__}")
        self.vocab_size = hf_config.vocab_size
        if not isinstance(pad_token_id, int) or not 0 <= pad_token_id < self.vocab_size:
            raise ValueError(
                f"pad_token_id={pad_token_id!r}; it must be a token id in [0, {self.vocab_size}) "
                f"(the tokenizer's pad_token_id)"
            )
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r}; it must be an integer >= 1")
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        self.config = copy.deepcopy(hf_config)  # from_config writes dtype/attention choices into it
        options = {"dtype": dtype, "attn_implementation": attn_implementation}
        experts_implementation = experts_implementation or _default_experts_implementation(self.config, dtype)
        if experts_implementation is not None:
            options["experts_implementation"] = experts_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            model = transformers.AutoModelForCausalLM.from_config(self.config, **options)
        self._model = model.to(self.device).eval().requires_grad_(False)
        self._slots, self._tied_names = _checkpoint_slots(self._model, self.config)
        self._weight_version = 0
        self._abort = False

    # -- RolloutEngine -------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @property
    def model(self) -> transformers.PreTrainedModel:
        """The live transformers model (for verification; generate() owns its state)."""
        return self._live_model()

    def close(self) -> None:
        self._model = None
        self._slots = {}

    def abort(self) -> None:
        """Stops the running `generate` at its next decode step (it raises GenerationAborted)."""
        self._abort = True

    def health(self) -> EngineHealth:
        alive = self._model is not None
        return EngineHealth(alive, "in-process transformers model" if alive else "closed")

    def counters(self) -> dict[str, int]:
        return {}  # nothing in this process retries or restarts

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, seed: int,
                 on_result=None) -> list[Rollout]:
        """Samples `sampling.n` responses per prompt; returns them prompt-major. At most
        `max_batch_size` requests are in flight (one chunk); `on_result` sees each rollout of a
        chunk when the chunk finishes. Request (p, s) draws from its own generator seeded from
        (seed, p, s), so results do not depend on chunking."""
        self._live_model()
        self._abort = False
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r}; it must be an integer >= 0")
        self._check_prompts(prompt_ids, sampling)
        # (prompt index, sample index) in prompt-major order
        rows = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.n)]
        rollouts: list[Rollout] = []
        for start in range(0, len(rows), self.max_batch_size):
            chunk = self._generate_chunk(rows[start : start + self.max_batch_size], prompt_ids, sampling, seed)
            for rollout in chunk:
                rollout.weight_version = self._weight_version
                if on_result is not None:
                    on_result(rollout)
            rollouts += chunk
        return rollouts

    @torch.no_grad()
    def update_weights(self, named_tensors: WeightSource, *, version: int, partial: bool = False) -> None:
        """Loads HF-checkpoint-named tensors (a stream, or a ``DiskWeights`` safetensors
        directory) into the live model, all or nothing. There is nothing to pause or flush: the
        engine generates only inside ``generate``.

        Every tensor is checked (known name, no duplicate, exact shape, floating point, finite)
        and staged before any is written, so a failed update leaves the model and the version
        untouched. A full update (default) must cover every tensor of `state_dict_hf()`;
        `partial=True` (not part of the RolloutEngine protocol) allows a subset. Tensors are
        copied as they arrive (in the engine's dtype and device), so the sender may reuse its
        buffers; staging costs one extra copy of the weights. On an error the engine stops
        reading `named_tensors`: a sender whose iterator drives collectives must drain it.
        `version` must exceed `weight_version`.
        """
        self._live_model()
        if not isinstance(version, int) or isinstance(version, bool) or version <= self._weight_version:
            raise ValueError(
                f"version={version!r}; weight versions must increase: the engine holds version "
                f"{self._weight_version}, send a larger one"
            )
        if isinstance(named_tensors, DiskWeights):
            named_tensors = _read_safetensors_dir(named_tensors.path)
        staged: dict[str, torch.Tensor] = {}
        for name, tensor in named_tensors:
            slot = self._slots.get(name)
            if slot is None:
                raise ValueError(self._unknown_name_message(name))
            if name in staged:
                raise ValueError(f"tensor {name!r} is sent twice in one update (version {version}); send it once")
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                got = getattr(tensor, "dtype", type(tensor).__name__)
                raise ValueError(f"tensor {name!r} must be a floating-point torch.Tensor, got {got}")
            expected = tuple(slot.view().shape)
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"tensor {name!r} has shape {tuple(tensor.shape)}, the model expects {expected} "
                    f"({self.config.model_type} config); check the HF config matches the trainer's model"
                )
            # A private copy in the engine's dtype/device: the sender may reuse its buffer (bucketed sync).
            staged_tensor = tensor.detach().to(device=slot.tensor.device, dtype=slot.tensor.dtype, copy=True)
            if not torch.isfinite(staged_tensor).all():
                raise ValueError(f"tensor {name!r} contains NaN or inf values; refusing to load it (version {version})")
            staged[name] = staged_tensor
        if not staged:
            raise ValueError(f"update_weights(version={version}) received no tensors")
        if not partial:
            missing = [name for name in self._slots if name not in staged]
            if missing:
                raise ValueError(
                    f"full weight update (version {version}) is missing {len(missing)} of {len(self._slots)} "
                    f"tensors, e.g. {missing[:4]}; send every tensor of state_dict_hf() or pass partial=True"
                )
        for name, tensor in staged.items():
            self._slots[name].view().copy_(tensor)
        self._weight_version = version

    def state_dict_hf(self) -> dict[str, torch.Tensor]:
        """The engine's weights under HF checkpoint names (per expert), as copies."""
        self._live_model()
        return {name: slot.view().detach().clone() for name, slot in self._slots.items()}

    # -- sampling loop -------------------------------------------------------------------------

    def _generate_chunk(self, rows, prompt_ids, sampling: SamplingParams, seed: int) -> list[Rollout]:
        """Samples one chunk of B <= max_batch_size rows, `rows[b] = (prompt index, sample index)`.

        The prompt pass feeds input_ids [B, P] (left-padded) and fills the KV cache; each decode
        step feeds [B, 1] and reads logits [B, V]. Steps stop when every row has finished.
        """
        model, device = self._model, self.device
        batch = len(rows)
        prompt_lengths = [len(prompt_ids[p]) for p, _ in rows]
        width = max(prompt_lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for row, (p, _) in enumerate(rows):  # left padding: every prompt ends at column width-1
            input_ids[row, width - prompt_lengths[row] :] = torch.tensor(prompt_ids[p])
            attention_mask[row, width - prompt_lengths[row] :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Positions count real tokens only, so a left-padded prompt sees the positions it would alone.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        generators = [_sample_generator(seed, p, s) for p, s in rows]
        stop_ids = torch.tensor(sampling.stop_token_ids, dtype=torch.long, device=device)

        cache = transformers.DynamicCache(config=model.config)
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        next_position = position_ids[:, -1] + 1  # [B]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens_per_step, log_probs_per_step, active_per_step = [], [], []
        for step in range(sampling.max_new_tokens):
            if self._abort:
                raise GenerationAborted("generation was aborted (EmbeddedEngine.abort())")
            active = ~finished
            tokens, log_probs = _sample_next_tokens(out.logits[:, -1, :].float(), sampling, generators, active)
            tokens_per_step.append(tokens)
            log_probs_per_step.append(log_probs)
            active_per_step.append(active)
            hit_stop = active & torch.isin(tokens, stop_ids)
            stopped |= hit_stop
            finished |= hit_stop
            if finished.all() or step == sampling.max_new_tokens - 1:
                break
            # Finished rows are fed padding that nothing attends to (mask 0); they are not sampled.
            feed = torch.where(finished, torch.full_like(tokens, self.pad_token_id), tokens)
            attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
            out = model(input_ids=feed[:, None], attention_mask=attention_mask, position_ids=next_position[:, None],
                        past_key_values=cache, use_cache=True)
            next_position = next_position + 1

        tokens = torch.stack(tokens_per_step, 1).tolist()  # [B, steps]
        log_probs = torch.stack(log_probs_per_step, 1).tolist()
        active = torch.stack(active_per_step, 1).tolist()
        stopped = stopped.tolist()
        rollouts = []
        for row, (p, s) in enumerate(rows):
            length = sum(active[row])  # active steps are a prefix
            rollouts.append(Rollout(
                sample_index=s,
                prompt_index=p,
                prompt_ids=list(prompt_ids[p]),
                response_ids=tokens[row][:length],
                response_log_probs=log_probs[row][:length],
                finish_reason="stop" if stopped[row] else "length",
            ))
        return rollouts

    # -- checks --------------------------------------------------------------------------------

    def _live_model(self) -> transformers.PreTrainedModel:
        if self._model is None:
            raise RuntimeError("this EmbeddedEngine is closed; build a new one")
        return self._model

    def _check_prompts(self, prompt_ids, sampling: SamplingParams) -> None:
        if not isinstance(prompt_ids, (list, tuple)):
            raise TypeError(f"prompt_ids must be a list of token-id lists, got {type(prompt_ids).__name__}")
        max_positions = getattr(self.config, "max_position_embeddings", None)
        for index, ids in enumerate(prompt_ids):
            if not isinstance(ids, (list, tuple)) or not ids:
                raise ValueError(f"prompt {index} is {ids!r}; every prompt must be a non-empty list of token ids")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt {index} has token ids {bad[:5]} outside [0, {self.vocab_size}) (the model's "
                    f"vocab_size); check the tokenizer matches the model"
                )
            if max_positions is not None and len(ids) + sampling.max_new_tokens > max_positions:
                raise ValueError(
                    f"prompt {index} ({len(ids)} tokens) + max_new_tokens={sampling.max_new_tokens} exceeds "
                    f"max_position_embeddings={max_positions}; shorten the prompt or lower max_new_tokens"
                )
        bad_stops = [t for t in sampling.stop_token_ids if t >= self.vocab_size]
        if bad_stops:
            raise ValueError(f"stop_token_ids {bad_stops} are outside [0, {self.vocab_size}) (the model's vocab_size)")

    def _unknown_name_message(self, name: str) -> str:
        if name in self._tied_names:
            return (f"tensor {name!r} is tied to {self._tied_names[name]!r} in this model (tie_word_embeddings); "
                    f"send only {self._tied_names[name]!r}, as the HF checkpoint does")
        examples = list(self._slots)[:3] + list(self._slots)[-2:]
        return (f"unknown tensor {name!r}: not a weight of this {self.config.model_type} model under HF checkpoint "
                f"names (e.g. {examples}; {len(self._slots)} in all, see state_dict_hf()); check the "
                f"Megatron->HF name mapping and the layer/expert counts")


def _read_safetensors_dir(path) -> Iterable[tuple[str, torch.Tensor]]:
    """Every tensor of the ``*.safetensors`` files of a directory, file by file."""
    from pathlib import Path

    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"weight directory {str(path)!r} holds no *.safetensors file")
    for file in files:
        with safe_open(str(file), framework="pt") as reader:
            for name in reader.keys():
                yield name, reader.get_tensor(name)


def _default_experts_implementation(config, dtype: torch.dtype) -> str | None:
    """"eager" when torch's grouped_mm would refuse the expert matrices, else None (transformers' default).

    grouped_mm needs every row stride to be a multiple of 16 bytes; a tiny bf16 MoE with
    moe_intermediate_size 20 (40 bytes) fails with "strides should be multiple of 16 bytes".
    """
    expert_ffn = getattr(config, "moe_intermediate_size", None)
    if expert_ffn is None or not hasattr(config, "num_experts_per_tok"):
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    if (expert_ffn * itemsize) % 16 or (config.hidden_size * itemsize) % 16:
        return "eager"
    return None


def _sample_generator(seed: int, prompt_index: int, sample_index: int) -> torch.Generator:
    """The private RNG of one sample: a pure function of (seed, prompt index, sample index)."""
    state = np.random.SeedSequence([seed, prompt_index, sample_index]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _sample_next_tokens(logits: torch.Tensor, sampling: SamplingParams, generators, active: torch.Tensor):
    """One sampling step. logits [B, V] fp32, active [B] bool -> (tokens [B], log_probs [B]).

    log_probs are of the unfiltered softmax(logits / T) (softmax(logits) when greedy); inactive
    rows get token 0 / log-prob 0 and consume no randomness.
    """
    if sampling.greedy:
        tokens = logits.argmax(-1)
        log_probs = F.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]
    else:
        scaled = logits / sampling.temperature
        log_probs_full = F.log_softmax(scaled, dim=-1)
        probs = F.softmax(_filter_top_k_top_p(scaled, sampling.top_k, sampling.top_p), dim=-1)
        # Exponential race: argmax(p / E) with E ~ Exp(1) i.i.d. is distributed as p. u = 0 gives
        # E = inf (that token loses); u < 1 so E > 0.
        noise = torch.ones_like(probs)
        for row in torch.nonzero(active).flatten().tolist():
            u = torch.rand(probs.shape[-1], generator=generators[row], dtype=torch.float64)
            noise[row] = (-torch.log(u)).to(device=probs.device, dtype=probs.dtype)
        tokens = (probs / noise).argmax(-1)
        log_probs = log_probs_full.gather(-1, tokens[:, None])[:, 0]
    zero = torch.zeros_like(tokens)
    return torch.where(active, tokens, zero), torch.where(active, log_probs, zero.to(log_probs.dtype))


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Sets logits outside the top-k, then outside the top-p nucleus of what is left, to -inf. [B, V]"""
    if 0 < top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the best token always stays).
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _checkpoint_slots(model, config) -> tuple[dict[str, _CheckpointSlot], dict[str, str]]:
    """HF checkpoint name -> slot in the live model, and tied name -> the name that carries it.

    Plain parameters keep their names. Fused experts (`*.experts.gate_up_proj` [E, 2I, H],
    `*.experts.down_proj` [E, H, I]) become per-expert `*.experts.{e}.{gate,up,down}_proj.weight`.
    Any other 3-D expert tensor is refused: its checkpoint layout is unknown here.
    """
    slots: dict[str, _CheckpointSlot] = {}
    tied: dict[str, str] = {}
    owner_of: dict[int, str] = {}
    hidden = config.hidden_size
    expert_ffn = getattr(config, "moe_intermediate_size", None)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in owner_of:  # tied weights (lm_head -> embed_tokens) appear once in checkpoints
            tied[name] = owner_of[id(tensor)]
            continue
        owner_of[id(tensor)] = name
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and tensor.dim() == 3:
            num_experts = tensor.shape[0]
            if leaf == "gate_up_proj" and tuple(tensor.shape[1:]) == (2 * expert_ffn, hidden):
                gate_rows, up_rows = slice(0, expert_ffn), slice(expert_ffn, 2 * expert_ffn)
                for e in range(num_experts):
                    slots[f"{prefix}.{e}.gate_proj.weight"] = _CheckpointSlot(tensor, (e, gate_rows))
                    slots[f"{prefix}.{e}.up_proj.weight"] = _CheckpointSlot(tensor, (e, up_rows))
                continue
            if leaf == "down_proj" and tuple(tensor.shape[1:]) == (hidden, expert_ffn):
                for e in range(num_experts):
                    slots[f"{prefix}.{e}.down_proj.weight"] = _CheckpointSlot(tensor, (e,))
                continue
            raise NotImplementedError(
                f"{config.model_type}: fused expert tensor {name!r} of shape {tuple(tensor.shape)} has no known "
                f"per-expert checkpoint layout (known: gate_up_proj [E, 2*{expert_ffn}, {hidden}], down_proj "
                f"[E, {hidden}, {expert_ffn}]); the embedded engine supports Qwen3-MoE / Qwen2 / Qwen3"
            )
        slots[name] = _CheckpointSlot(tensor)
    return slots, tied


def checkpoint_state_dict(model: transformers.PreTrainedModel) -> dict[str, torch.Tensor]:
    """A live transformers model's weights under HF *checkpoint* names (per-expert tensors, no
    tied ``lm_head``), as views: the in-memory -> on-disk translation without writing files."""
    slots, _ = _checkpoint_slots(model, model.config)
    return {name: slot.view().detach() for name, slot in slots.items()}
