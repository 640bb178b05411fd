"""Process groups: torch.distributed + Megatron's parallel_state, from ``ParallelConfig``.

On CPU the backend is gloo and the CPU compatibility layer is applied first; on GPU it is NCCL with
one device per local rank. Works both under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set) and as
a plain single process (a one-rank gloo/NCCL group on a free localhost port).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gmpo_megatron.megatron import cpu_compat


@dataclass(frozen=True)
class Layout:
    """The parallel layout this process runs in (read back from Megatron after initialisation)."""

    world_size: int
    rank: int
    tp: int
    pp: int
    ep: int
    etp: int
    cp: int
    dp: int
    tp_rank: int
    pp_rank: int
    ep_rank: int
    dp_rank: int

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1


_GROUPS_OF = None  # (the default process group, the sizes) Megatron's groups were made for


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None, cp: int = 1,
                     seed: int = 0, timeout_minutes: int = 30) -> Layout:
    """Initialise torch.distributed (if needed) and Megatron's model-parallel groups."""
    from datetime import timedelta

    cpu_compat.apply()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(minutes=timeout_minutes)
        if "RANK" in os.environ:  # torchrun (or a user-provided rendezvous)
            dist.init_process_group(backend=backend, timeout=timeout)
        else:  # a plain single process: an in-memory store, no TCP port to race for
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    world = dist.get_world_size()
    etp = tp if etp is None else etp
    model_parallel = tp * pp * cp
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {model_parallel}; "
            "launch a multiple of that many processes (torchrun --nproc_per_node ...)"
        )
    expert_model_parallel = etp * ep * pp
    if world % expert_model_parallel:
        raise ValueError(
            f"world size {world} is not divisible by etp*ep*pp = {etp}*{ep}*{pp}: set parallel.etp "
            f"(expert tensor parallel; it defaults to tp={tp}) so that etp*ep*pp divides {world}, "
            "e.g. parallel.etp=1"
        )
    global _GROUPS_OF
    sizes = (tp, pp, cp, ep, etp)
    if ps.model_parallel_is_initialized() and _GROUPS_OF == (dist.group.WORLD, sizes):
        # the same layout again (a converter or a test in a process that already has it): keep
        # the groups; re-creating them would leave the old ones' gloo threads running (Megatron's
        # destroy_model_parallel forgets groups, it does not destroy them)
        model_parallel_cuda_manual_seed(seed)
        return current_layout()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    _GROUPS_OF = (dist.group.WORLD, sizes)
    model_parallel_cuda_manual_seed(seed)
    cpu_compat.apply()  # point megatron modules imported by initialisation at the CPU proxy
    return current_layout()


def current_layout() -> Layout:
    from megatron.core import parallel_state as ps

    return Layout(
        world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp=ps.get_tensor_model_parallel_world_size(), pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(), cp=ps.get_context_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), ep_rank=ps.get_expert_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
