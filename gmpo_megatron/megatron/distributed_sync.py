"""Weight sync by broadcast (``rollout.sglang.weight_sync=distributed``): the live Megatron model
-> HF tensors -> SGLang servers through a torch.distributed group they join, no filesystem.

One update (``DistributedWeightSync.push``, collective on every rank):

1. global rank 0 (the engine) pauses every server and opens its weight-update session, and
   tells every rank the servers' group layout (URL, TP size);
2. pipeline stage by stage, in turn: the stage's sender (its TP, DP and CP rank 0, as in
   ``disk_sync``) streams the stage's tensors (gathered to it over TP / ETP / EP in buckets,
   ``weight_gather``, mapped to HF names) into buckets of at most ``bucket_bytes``, non-expert tensors first,
   then expert tensors, and sends each bucket to every server (``rollout.sglang_distributed``);
   the stage's other ranks take part in the gathers. The last bucket of the last stage flushes the
   servers' prefix cache and sets their weight version;
3. rank 0 closes the sessions, continues generation and checks every server's version.

Each stage's sender is rank 0 of its own group (SGLang receives every broadcast from group
rank 0), opened at its first update and kept until ``close``; it is re-opened when the set of
servers changes. The stages take turns because a server serves one call at a time: two stages
sending at once to two servers could each hold one server while waiting for the other.

Launched servers start from a weights directory, so the first update after they are launched goes
by disk (``push`` returns False and the trainer writes it); every later one is broadcast.

A failure anywhere (a server refusing a bucket, a stream mismatch) is raised on every rank after
the stage's other ranks have finished their gathers, so no rank is left in a collective.

The wire side (buckets, the group, the HTTP calls) is ``gmpo_megatron.rollout.weight_buckets`` and
``gmpo_megatron.rollout.sglang_distributed``, which import nothing of Megatron.
"""

from __future__ import annotations

import uuid

import torch
import torch.distributed as dist

from gmpo_megatron.megatron.weight_gather import DEFAULT_BUCKET_BYTES, gather_stage, is_stage_sender
from gmpo_megatron.megatron.weights import _stage_metadata
from gmpo_megatron.models.base import QwenMapping
from gmpo_megatron.rollout.weight_buckets import WeightSpec


def stage_pass_specs(model_chunks, mapping: QwenMapping, experts: bool) -> list[WeightSpec]:
    """HF specs of this stage's non-expert (``experts=False``) or expert tensors, in stream order."""
    expected = mapping.expected_hf_shapes()
    specs = []
    for name, _, dtype in _stage_metadata(model_chunks, experts=experts):
        if mapping.tied and name == "output_layer.weight":
            continue
        specs += [WeightSpec(hf, expected[hf], dtype) for hf in mapping.group_of(name).hf_names]
    return specs


def stage_pass_stream(model_chunks, mapping: QwenMapping, experts: bool,
                      gather_bytes: int = DEFAULT_BUCKET_BYTES):
    """(HF name, tensor) of one pass, in the order of :func:`stage_pass_specs`, on the stage's
    sender (gathered in buckets of ``gather_bytes``, ``weight_gather``). Collective over the
    stage: every rank of the stage must run it to the end."""
    for name, tensor in gather_stage(model_chunks, experts, gather_bytes):
        if mapping.tied and name == "output_layer.weight":
            continue
        yield from mapping.to_hf(name, tensor)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _from_rank0(value):
    """``value`` as global rank 0 holds it, on every rank."""
    if _world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _raise_any(error: BaseException | None, what: str) -> None:
    """Raise on every rank when any rank failed (the failing rank raises its own error)."""
    rank, world = _world()
    messages = [None if error is None else f"{type(error).__name__}: {error}"]
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, messages[0])
        messages = gathered
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m is not None]
    if failed:
        r, message = failed[0]
        raise RuntimeError(f"{what} failed on global rank {r}: {message}")


class DistributedWeightSync:
    """The per-rank state of ``weight_sync=distributed``; build it on every rank, call ``push``
    on every rank for each update and ``close`` at the end."""

    def __init__(self, model_chunks, mapping: QwenMapping, *, bucket_bytes: int, timeout_s: float,
                 gather_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        self.model = model_chunks
        self.mapping = mapping
        self.bucket_bytes = bucket_bytes
        self.gather_bytes = gather_bytes
        self.timeout_s = timeout_s
        self._run_token = uuid.uuid4().hex[:8]  # rank 0's is the one used (broadcast per update)
        self._sender = None  # this rank's StageSender, when it is its stage's sender

    def push(self, engine, version: int) -> bool:
        """Collective. Send the model to the servers as weight version ``version``; ``engine`` is
        the SGLangEngine on global rank 0 (None elsewhere). Returns False, having sent nothing,
        when the engine's launched servers have not started yet (the caller syncs by disk)."""
        from megatron.core import parallel_state as ps

        rank, _ = _world()
        plan, error = None, None
        if rank == 0:
            try:
                if engine.started:
                    plan = ("go", engine.begin_distributed_update(version), self._run_token)
                else:
                    plan = ("boot", None, None)
            except Exception as caught:  # noqa: BLE001 - raised on every rank below
                error = caught
        plan = _from_rank0(plan if error is None else ("error", f"{type(error).__name__}: {error}", None))
        if error is not None:
            raise error
        kind, targets, token = plan
        if kind == "error":
            raise RuntimeError(f"the weight update to version {version} failed on global rank 0: {targets}")
        if kind == "boot":
            return False

        error = None
        stage, stages = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        try:
            for turn in range(stages):
                if turn == stage:
                    error = self._send_stage(stage, stage == stages - 1, targets, token, version)
                _raise_any(error, f"weight update to version {version} (pipeline stage {turn})")
        except Exception as caught:
            if rank == 0:  # a server that died mid-broadcast is the cause to report, not the socket
                engine.raise_if_a_server_died(version, caught)
            raise

        error = None
        if rank == 0:
            try:
                engine.end_distributed_update(version)
            except Exception as caught:  # noqa: BLE001 - raised on every rank below
                error = caught
        _raise_any(error, f"finishing the weight update to version {version}")
        return True

    def _send_stage(self, stage: int, last_stage: bool, targets, token: str, version: int):
        """This rank's part of its stage's turn; returns the sender's error instead of raising, so
        the stage's other ranks are not left waiting in a gather."""
        sender_rank = is_stage_sender()
        passes = [(experts, stage_pass_specs(self.model, self.mapping, experts)) for experts in (False, True)]
        passes = [(experts, specs) for experts, specs in passes if specs]
        error = None
        for index, (experts, specs) in enumerate(passes):
            stream = stage_pass_stream(self.model, self.mapping, experts, self.gather_bytes)
            if sender_rank and error is None:
                final = str(version) if last_stage and index == len(passes) - 1 else None
                try:
                    self._stage_sender(stage, targets, token).send(specs, stream, final_version=final)
                except Exception as caught:  # noqa: BLE001 - reported on every rank by the caller
                    error = caught
            for _ in stream:  # finish the gathers (everything, for the stage's other ranks)
                pass
        return error

    def _stage_sender(self, stage: int, targets, token: str):
        from gmpo_megatron.rollout.sglang_distributed import StageSender

        name = f"gmpo-weights-pp{stage}-{token}"
        sender = self._sender
        if sender is not None and (not sender.is_open or sender.targets != tuple(targets)
                                   or sender.group_name != name):
            sender.close()
            sender = self._sender = None
        if sender is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
            sender = StageSender(targets, name, bucket_bytes=self.bucket_bytes, timeout_s=self.timeout_s,
                                 device=device)
            self._sender = sender
        if not sender.is_open:
            sender.open()
        return sender

    def close(self) -> list[str]:
        """Destroy this rank's group on the servers (not collective); returns their complaints."""
        sender, self._sender = self._sender, None
        return sender.close() if sender is not None else []
