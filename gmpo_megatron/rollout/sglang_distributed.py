"""``weight_sync=distributed``: HF tensors broadcast from the trainer into SGLang servers through
a torch.distributed group that the servers join (no filesystem between them).

SGLang's side (sglang 0.5.21, ``srt/model_executor/model_runner_components/weight_updater.py``,
``srt/managers/scheduler_components/weight_updater.py``):

- ``POST /init_weights_update_group`` {master_address, master_port, rank_offset, world_size,
  group_name, backend}: every TP rank of the server joins group ``group_name`` as rank
  ``rank_offset + tp_rank`` through ``init_custom_process_group`` (a ``tcp://`` rendezvous on
  master_address:master_port, then torch's private ``_new_process_group_helper``). The sender is
  rank 0 and hosts the rendezvous store. ``POST /destroy_weights_update_group`` {group_name}.
- ``POST /update_weights_from_distributed`` {names, dtypes, shapes, group_name, load_format,
  flush_cache, weight_version}: with ``load_format="flattened_bucket"`` each TP rank allocates
  the named tensors, flattens them into ONE ``uint8`` buffer (``weight_buckets`` layout) and
  receives ONE broadcast from rank 0 into it, then ``model.load_weights`` on the rebuilt tensors
  (a subset of the model's tensors per call is fine). ``flush_cache`` flushes the prefix cache
  after the load; ``weight_version`` becomes the server's version. The call answers when the
  bucket is loaded, so the HTTP request and the broadcast must run at the same time.
- Since 0.5.21 these calls must come between ``POST /begin_weight_update`` and
  ``POST /end_weight_update`` (a weight-update session; otherwise ``success: false``).

Our side: the group cannot come from ``torch.distributed.new_group`` (that only groups processes
of the trainer's own world). :class:`WeightUpdateGroup` builds rank 0 of the same group by hand:
a ``TCPStore`` server, the same key prefixes the receiver's stack puts on it (sglang's
``PrefixStore(group_name)``, torch's ``PrefixStore(group_name + "/")`` and the per-device
``PrefixStore("cpu/" | "cuda/")``), and a ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` on top.
It is not registered with torch's global state, so it cannot disturb the trainer's own groups
(torch's helper would try to split the trainer's default NCCL communicator when that one is bound
to a device).

Who sends (``gmpo_megatron.megatron.distributed_sync``): one sender per pipeline stage, each rank 0
of its own group (``gmpo-weights-pp<stage>-<run>``), the stages one after another (a server
serves one group's call at a time; two stages sending at once to two servers could deadlock).
Backend: ``nccl`` when the trainer runs on CUDA, else ``gloo`` (the CPU server accepts it; tested
end to end in ``tests/rollout/test_sglang_distributed.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from gmpo_megatron.rollout.sglang_http import BadResponse, RequestRejected, ServerClient, SGLangError
from gmpo_megatron.rollout.weight_buckets import (
    WeightSpec,
    bucket_nbytes,
    bucket_offsets,
    dtype_name,
    plan_buckets,
    write_into_bucket,
)

LOAD_FORMAT = "flattened_bucket"
# Groups left with a collective in flight (a server refused its call): destroying one would wait
# for that collective until the group's timeout, so they are kept here until the process exits.
_ABANDONED: list = []


@dataclass(frozen=True)
class ServerTarget:
    """One server of the group: its TP ranks are group ranks ``rank_offset .. rank_offset + tp_size - 1``."""

    url: str
    tp_size: int


def group_ranks(targets: Sequence[ServerTarget]) -> tuple[int, list[int]]:
    """(world size, rank_offset of each server): rank 0 is the sender, then each server's TP ranks."""
    offsets, next_rank = [], 1
    for target in targets:
        offsets.append(next_rank)
        next_rank += target.tp_size
    return next_rank, offsets


def local_address_for(url: str) -> str:
    """This host's address on the route to ``url``'s host: where the servers reach our store."""
    host = urlparse(url).hostname or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, 9))  # UDP: no packet is sent, the kernel picks the route
            return probe.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


NCCL_ENV = {"NCCL_CUMEM_ENABLE": "0", "NCCL_NVLS_ENABLE": "0"}


def check_nccl_env(environ) -> None:
    """The weight-update group needs cuMem and NVLS off on both sides (docs/models.md, NCCL table); NCCL reads
    them once per process, so they must be in the environment from the start."""
    wrong = {k: environ.get(k) for k, v in NCCL_ENV.items() if environ.get(k) != v}
    if wrong:
        raise RuntimeError(
            f"rollout.sglang.weight_sync=distributed over NCCL needs {' '.join(f'{k}=0' for k in NCCL_ENV)} "
            f"in the trainer's environment (found {wrong}); export them before torchrun, and in the "
            "SGLang servers' environment (rollout.sglang.launch sets them for servers it starts)")


class WeightUpdateGroup:
    """Rank 0 (the sender) of an SGLang weight-update group of ``world_size`` ranks.

    The rendezvous store listens on ``host`` (an address of this machine the servers can reach)
    at a port the OS picks (``port``); send both to the servers, then ``connect()`` (it blocks
    until every server rank has joined, up to ``timeout_s``)."""

    def __init__(self, group_name: str, world_size: int, backend: str, timeout_s: float,
                 host: str) -> None:
        from torch.distributed import TCPStore

        if backend not in ("gloo", "nccl"):
            raise ValueError(f"backend={backend!r}; the weight-update group uses 'gloo' or 'nccl'")
        self.group_name, self.world_size, self.backend = group_name, world_size, backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self._store = TCPStore(host, 0, world_size, is_master=True, timeout=self.timeout,
                               wait_for_workers=False)
        self.port = self._store.port
        self._pg = None

    def _backend_store(self):
        from torch.distributed import PrefixStore

        # The receiver's keys: sglang's PrefixStore(group_name) over the rendezvous store, then
        # torch's _new_process_group_helper adds "<group_name>/" and "<device>/" ("cuda/" for
        # nccl; gloo registers for cpu first).
        device = "cuda" if self.backend == "nccl" else "cpu"
        return PrefixStore(f"{device}/", PrefixStore(f"{self.group_name}/",
                                                     PrefixStore(self.group_name, self._store)))

    def connect(self) -> None:
        from torch.distributed import ProcessGroupGloo

        store = self._backend_store()
        if self.backend == "gloo":
            pg = ProcessGroupGloo(store, 0, self.world_size, self.timeout)
        else:
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options.is_high_priority_stream = False
            options._timeout = self.timeout
            pg = ProcessGroupNCCL(store, 0, self.world_size, options)
        pg._set_sequence_number_for_group()  # as torch's helper does on every member
        self._pg = pg

    def broadcast(self, buffer: torch.Tensor):
        """Start the broadcast of ``buffer`` from rank 0; returns the ``Work`` to wait on."""
        from torch.distributed import BroadcastOptions

        options = BroadcastOptions()
        options.rootRank, options.rootTensor = 0, 0
        return self._pg.broadcast([buffer], options)

    def close(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None and self.backend == "nccl":
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        self._store = None


class _Http:
    """An event loop in a thread with one aiohttp session and a ``ServerClient`` per server, so
    HTTP calls to every server run while the calling thread broadcasts."""

    def __init__(self, urls: Sequence[str], timeout_s: float) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-weight-sync", daemon=True)
        self._thread.start()
        self.clients: list[ServerClient] = self.run(self._open(list(urls), timeout_s)).result()

    async def _open(self, urls, timeout_s):
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return [ServerClient(url, self._session, timeout_s) for url in urls]

    def run(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def on_every_server(self, path: str, bodies: Sequence[dict],
                        timeout_s: float) -> concurrent.futures.Future:
        async def call_all():
            return await asyncio.gather(*(c.control(path, b, timeout_s=timeout_s)
                                          for c, b in zip(self.clients, bodies)))

        return self.run(call_all())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self.run(self._session.close()).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def _wait(what: str, http: concurrent.futures.Future, background, timeout_s: float):
    """Wait for the HTTP calls and the collective side (a torch ``Work`` or a Future) together; a
    failed HTTP call raises at once (its server will never join the collective, which would
    otherwise block until the group's timeout)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if http.done() and http.exception() is not None:
            raise SGLangError(f"{what}: {http.exception()}") from None
        side_done = background.done() if isinstance(background, concurrent.futures.Future) else (
            background.is_completed())
        if side_done and http.done():
            break
        if time.monotonic() > deadline:
            raise SGLangError(f"{what}: no answer within {timeout_s:g} s (rollout.sglang.request_timeout_s)")
        time.sleep(0.002)
    if isinstance(background, concurrent.futures.Future):
        background.result()
    else:
        background.wait()
    return http.result()


class StageSender:
    """The trainer side of one pipeline stage's weight-update group: opens it on every server,
    sends the stage's tensors bucket by bucket, destroys it at ``close``."""

    def __init__(self, targets: Sequence[ServerTarget], group_name: str, *, bucket_bytes: int,
                 timeout_s: float, backend: str | None = None, device: torch.device | None = None) -> None:
        if not targets:
            raise ValueError("StageSender needs at least one server")
        self.targets = tuple(targets)
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.timeout_s = timeout_s
        self.backend = backend or default_backend()
        self.device = device or (torch.device("cuda", torch.cuda.current_device())
                                 if self.backend == "nccl" else torch.device("cpu"))
        self.buckets_sent = 0
        self.bytes_sent = 0
        self._buffer: torch.Tensor | None = None
        self._group: WeightUpdateGroup | None = None
        self._abandoned_names: list[str] = []
        self._http = _Http([t.url for t in self.targets], timeout_s)

    @property
    def is_open(self) -> bool:
        return self._group is not None

    def open(self) -> None:
        if self.backend == "nccl":
            import os

            check_nccl_env(os.environ)
        world_size, offsets = group_ranks(self.targets)
        address = local_address_for(self.targets[0].url)
        group = WeightUpdateGroup(self.group_name, world_size, self.backend, self.timeout_s, address)
        bodies = [{"master_address": address, "master_port": group.port, "rank_offset": offset,
                   "world_size": world_size, "group_name": self.group_name, "backend": self.backend}
                  for offset in offsets]
        http = self._http.on_every_server("/init_weights_update_group", bodies, self.timeout_s)
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-group-connect")
        try:
            _wait(f"joining weight-update group {self.group_name} ({world_size} ranks, {self.backend}, "
                  f"store {address}:{group.port})", http, pool.submit(group.connect), self.timeout_s)
        except BaseException:
            _ABANDONED.append(group)
            raise
        finally:
            pool.shutdown(wait=False)
        self._group = group

    def send(self, specs: Sequence[WeightSpec], stream: Iterator[tuple[str, torch.Tensor]], *,
             final_version: str | None) -> None:
        """Send ``specs`` (one pass, in stream order) as buckets, reading the tensors from
        ``stream``. ``final_version``: this is the update's last pass; its last bucket sets the
        servers' weight version (``end_update`` flushes their prefix cache)."""
        if self._group is None:
            raise RuntimeError("StageSender.send needs an open group (open() first)")
        buckets = plan_buckets(specs, self.bucket_bytes)
        if [s for b in buckets for s in b] != list(specs):
            raise ValueError("StageSender.send takes one pass (all expert or all non-expert tensors)")
        for index, bucket in enumerate(buckets):
            buffer = self._fill(bucket, stream)
            last = final_version is not None and index == len(buckets) - 1
            body = {"names": [s.name for s in bucket], "dtypes": [dtype_name(s.dtype) for s in bucket],
                    "shapes": [list(s.shape) for s in bucket], "group_name": self.group_name,
                    # the cache is flushed after the session (end_update): a failed flush inside
                    # the update would assert in sglang 0.5.21 and kill the server
                    "load_format": LOAD_FORMAT, "flush_cache": False, "abort_all_requests": False,
                    "weight_version": final_version if last else None}
            http = self._http.on_every_server("/update_weights_from_distributed",
                                              [body] * len(self.targets), self.timeout_s)
            work = self._group.broadcast(buffer)
            try:
                _wait(f"weight bucket {index + 1}/{len(buckets)} of group {self.group_name} "
                      f"({len(bucket)} tensors from {bucket[0].name}, {buffer.numel()} bytes)",
                      http, work, self.timeout_s)
            except BaseException:
                _ABANDONED.append(self._group)
                self._abandoned_names.append(self._group.group_name)
                self._group = None  # unusable now; the next update opens a new group
                raise
            self.buckets_sent += 1
            self.bytes_sent += buffer.numel()

    def _fill(self, bucket: Sequence[WeightSpec], stream) -> torch.Tensor:
        size = bucket_nbytes(bucket)
        if self._buffer is None or self._buffer.numel() < size:
            self._buffer = torch.empty(max(size, min(self.bucket_bytes, 1 << 30)), dtype=torch.uint8,
                                       device=self.device)
        buffer = self._buffer[:size]
        for spec, (start, _) in zip(bucket, bucket_offsets(bucket)):
            try:
                name, tensor = next(stream)
            except StopIteration:
                raise RuntimeError(f"the stage's tensor stream ended before {spec.name}") from None
            if name != spec.name:
                raise RuntimeError(f"the stage streamed {name} where its plan has {spec.name}")
            write_into_bucket(buffer, start, spec, tensor.to(self.device))
        return buffer

    def close(self) -> list[str]:
        """Destroy the group on every server and here; returns the servers' complaints (if any)."""
        problems = []
        names = self._abandoned_names + ([self._group.group_name] if self._group is not None else [])
        for name in names:
            http = self._http.on_every_server("/destroy_weights_update_group",
                                              [{"group_name": name}] * len(self.targets), 60)
            try:
                http.result(timeout=90)
            except (SGLangError, concurrent.futures.TimeoutError) as error:
                if name == getattr(self._group, "group_name", None):
                    problems.append(str(error))
        self._abandoned_names = []
        if self._group is not None:
            self._group.close()
            self._group = None
        self._buffer = None
        self._http.close()
        return problems


# -- the engine's side (global rank 0): the update session on every server --------------------
async def begin_update(clients: Sequence[ServerClient]) -> list[ServerTarget]:
    """Pause generation and open a weight-update session on every server; returns each server's
    group layout (TP size from ``/server_info``)."""
    targets, begun = [], []
    try:
        for client in clients:
            info = await client.request("GET", "/server_info", timeout_s=60)
            if not isinstance(info, dict) or not isinstance(info.get("tp_size"), int):
                raise BadResponse(f"SGLang server {client.url}/server_info has no tp_size: {str(info)[:200]}")
            if info.get("dp_size", 1) != 1 and not info.get("enable_dp_attention"):
                raise RequestRejected(
                    f"SGLang server {client.url} runs dp_size={info.get('dp_size')}: SGLang's "
                    "update_weights_from_distributed needs dp_size=1 (or DP attention); run one "
                    "server per DP replica, or use rollout.sglang.weight_sync=disk")
            await client.pause()
            begun.append(client)
            await client.control("/begin_weight_update", {}, timeout_s=120)
            targets.append(ServerTarget(client.url, info["tp_size"]))
    except BaseException:
        for client in begun:
            try:
                await client.control("/continue_generation", {}, timeout_s=120)
            except SGLangError:
                pass
        raise
    return targets


async def end_update(clients: Sequence[ServerClient], version: int) -> None:
    """Close the session, continue generation, and check every server took ``version``."""
    problems = []
    for client in clients:
        try:
            await client.control("/end_weight_update", {}, timeout_s=600)
            await client.flush_cache()
        except SGLangError as error:
            problems.append(str(error))
        finally:
            await client.control("/continue_generation", {}, timeout_s=120)
        info = await client.model_info()
        if info.get("weight_version") != str(version):
            problems.append(f"SGLang server {client.url} reports weight version "
                            f"{info.get('weight_version')!r} after the distributed update to {version}")
    if problems:
        raise SGLangError("; ".join(problems))
