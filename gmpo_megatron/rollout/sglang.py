"""``SGLangEngine``: rollouts from SGLang servers (launched by us or attached), over async HTTP.

Requests. Each (prompt, sample) is its own request (n=1) with its own sampling seed
(``request_seed``), so one request's sample does not depend on how others are batched and the
servers' prefix (radix) cache shares the prompt between a prompt's n requests. Requests travel
``requests_per_call`` to a ``/generate`` call (a batch body: one HTTP round trip and one
tokenizer-manager hop for many requests; the server schedules each on its own). All calls of a
step are submitted at once; at most ``max_in_flight`` requests per server are in flight; each
call goes to the healthy server with the fewest requests in flight (client-side balancing), or to
``router_url`` (an ``sglang_router``) when one is given. Results are collected as calls finish
and returned prompt-major.

Faults (every one counted in ``counters()``, logged per step in ``metrics.jsonl``):

- connection errors, timeouts and 5xx are retried with exponential backoff, at most
  ``max_retries`` times per request (``sglang_retries``);
- a launched server whose process died is restarted from the current weights directory at the
  current weight version, at most ``max_restarts`` times in all (``sglang_restarts``); the
  requests it held are resubmitted (``sglang_resubmitted``);
- an attached server that keeps failing is dropped from the rotation while another stays healthy
  (``sglang_servers_lost``); with none left the step fails with the servers' errors;
- a 4xx, a malformed or aborted response, or a response from another weight version is an error
  at once (``sglang_http.parse_generation``).

Weights. ``update_weights(DiskWeights(path, V), version=V)``: on every server, pause generation
(``retract``), ``/update_weights_from_disk`` with ``weight_version=V``, ``/flush_cache`` (retried
while the server still holds requests), continue, then ``/model_info`` must report V. Launched servers start at the first update, from
that directory. ``check_weights`` (probe) compares the server's log-probs of a fixed sequence
with the trainer's after each update (``Trainer.sync_weights``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from gmpo_megatron.rollout.engine import (
    DiskWeights,
    EngineHealth,
    GenerationAborted,
    Rollout,
    SamplingParams,
    request_seed,
)
from gmpo_megatron.rollout.sglang_http import (
    BadResponse,
    RequestRejected,
    ServerClient,
    ServerUnavailable,
    SGLangError,
    generate_payload,
    parse_generation,
)
from gmpo_megatron.rollout.sglang_launch import ServerProcess, ServerSpec


@dataclass(frozen=True)
class RouteLayout:
    """How to read the engine's routed experts (R3): the model's MoE layers and top-k."""

    num_layers: int
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8 if self.num_experts <= 256 else torch.int16

    def per_layer(self, flat, url: str) -> dict[int, torch.Tensor]:
        """int32 ``[positions, L * top_k]`` -> ``{MoE layer: [positions, top_k]}``."""
        positions = flat.shape[0]
        if flat.shape[1] == self.num_layers * self.top_k:
            grid = flat.reshape(positions, self.num_layers, self.top_k)
            layers = {layer: grid[:, layer] for layer in self.moe_layers}
        elif flat.shape[1] == len(self.moe_layers) * self.top_k:
            grid = flat.reshape(positions, len(self.moe_layers), self.top_k)
            layers = {layer: grid[:, i] for i, layer in enumerate(self.moe_layers)}
        else:
            raise BadResponse(f"SGLang server {url}: routed_experts has {flat.shape[1]} ids per position; "
                              f"the model has {self.num_layers} layers ({len(self.moe_layers)} MoE) x "
                              f"top-{self.top_k}: does the server run the trainer's model?")
        out = {}
        for layer, ids in layers.items():
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
                raise BadResponse(f"SGLang server {url}: routed expert ids of layer {layer} span "
                                  f"[{ids.min()}, {ids.max()}], the model has {self.num_experts} experts")
            out[layer] = torch.from_numpy(ids.astype("int64")).to(self.dtype)
        return out


@dataclass
class _Server:
    url: str
    client: ServerClient | None = None
    process: ServerProcess | None = None
    in_flight: int = 0
    healthy: bool = True
    failures: int = 0  # consecutive transport failures
    last_error: str = ""
    recovering: asyncio.Lock | None = None


@dataclass
class FaultPolicy:
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    max_restarts: int = 2
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0


@dataclass
class _Counters:
    retries: int = 0
    restarts: int = 0
    resubmitted: int = 0
    servers_lost: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"sglang_retries": self.retries, "sglang_restarts": self.restarts,
                "sglang_resubmitted": self.resubmitted, "sglang_servers_lost": self.servers_lost}


class SGLangEngine:
    """A ``RolloutEngine`` over SGLang servers: ``urls`` (attached), or ``launch`` specs (one
    per server, started at the first weight update), optionally with ``router_url`` for
    generation. ``routes`` asks for routed experts (R3)."""

    weight_transports = ("disk", "distributed")

    def __init__(self, *, urls: list[str] | None = None, launch: list[ServerSpec] | None = None,
                 router_url: str | None = None, max_in_flight: int = 256, requests_per_call: int = 16,
                 faults: FaultPolicy | None = None, routes: RouteLayout | None = None) -> None:
        if bool(urls) == bool(launch):
            raise ValueError("SGLangEngine needs either urls (attached servers) or launch specs, not both")
        self.faults = faults or FaultPolicy()
        self.max_in_flight = max_in_flight
        if requests_per_call < 1:
            raise ValueError(f"requests_per_call={requests_per_call}; it must be >= 1")
        self.requests_per_call = requests_per_call
        self.routes = routes
        self.router_url = router_url.rstrip("/") if router_url else None
        self._servers = ([_Server(url.rstrip("/")) for url in urls] if urls
                         else [_Server(spec.url, process=ServerProcess(spec)) for spec in launch])
        self._launched = bool(launch)
        self._started = not self._launched
        self._version = 0
        self._weights: Path | None = None
        self._counters = _Counters()
        self._abort = threading.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        self._session = None
        self._run(self._open())
        if not self._launched:
            self._run(self._attach())

    # -- event loop plumbing ----------------------------------------------------------------
    def _run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        for server in self._servers:
            server.client = ServerClient(server.url, self._session, self.faults.request_timeout_s)
            server.recovering = asyncio.Lock()
        self._router = (ServerClient(self.router_url, self._session, self.faults.request_timeout_s)
                        if self.router_url else None)

    async def _attach(self) -> None:
        """Attached servers must answer now: a wrong URL is an error at start, not at step 0."""
        problems = []
        for server in self._servers:
            try:
                info = await server.client.model_info()
                server.last_error = ""
                if not info.get("is_generation", True):
                    problems.append(f"{server.url} serves an embedding model, not a generator")
            except SGLangError as error:
                problems.append(str(error))
        if problems:
            raise SGLangError("rollout.sglang.urls: " + "; ".join(problems) + " -- start the servers "
                              "(python -m sglang.launch_server ...) or fix the URLs, or use "
                              "rollout.sglang.launch to have the trainer start them")

    # -- RolloutEngine ------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self._servers]

    def server_pids(self) -> list[int | None]:
        return [s.process.pid if s.process else None for s in self._servers]

    def counters(self) -> dict[str, int]:
        return self._counters.as_dict()

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, *, seed: int,
                 on_result: Callable[[Rollout], None] | None = None) -> list[Rollout]:
        if not self._started:
            raise RuntimeError("the SGLang servers start at the first update_weights (they load the "
                               "trainer's weights): push weights before generating")
        if not isinstance(sampling, SamplingParams):
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if not prompt_ids or any(not ids for ids in prompt_ids):
            raise ValueError("every prompt must be a non-empty list of token ids")
        self._abort.clear()
        return self._run(self._generate_all(prompt_ids, sampling, seed, on_result))

    def abort(self) -> None:
        self._abort.set()

        def cancel() -> None:
            for task in list(self._tasks):
                task.cancel()

        self._loop.call_soon_threadsafe(cancel)

    def update_weights(self, weights: DiskWeights, *, version: int) -> None:
        if not isinstance(weights, DiskWeights):
            raise TypeError("SGLangEngine loads weights from disk: pass DiskWeights(path, version) "
                            "(rollout.sglang.weight_sync=disk)")
        if not isinstance(version, int) or version <= self._version or weights.version != version:
            raise ValueError(f"version={version!r} (weights for {weights.version}); weight versions must "
                             f"increase: the servers hold version {self._version}")
        self._run(self._update_all(Path(weights.path), version))

    # weight_sync=distributed: the trainer's senders broadcast between these two calls
    # (gmpo_megatron.megatron.distributed_sync; the session protocol is rollout.sglang_distributed).
    @property
    def started(self) -> bool:
        """False until launched servers have booted (from the first, disk, update)."""
        return self._started

    def begin_distributed_update(self, version: int):
        """Pause every healthy server and open its weight-update session; returns the servers'
        ``ServerTarget`` (URL, TP size) for the senders' groups."""
        from gmpo_megatron.rollout.sglang_distributed import begin_update

        if not isinstance(version, int) or version <= self._version:
            raise ValueError(f"version={version!r}; weight versions must increase: the servers hold "
                             f"version {self._version}")
        return self._run(self._begin_distributed())

    async def _begin_distributed(self):
        """``begin_update`` on the healthy servers. A launched server found dead (before or while
        the session opens) is restarted from the disk weights when a directory holds the current
        version, once, and the session opened again; otherwise ``_recover`` says why it cannot be."""
        from gmpo_megatron.rollout.sglang_distributed import begin_update

        for attempt in range(2):
            for server in self._dead_launched():
                await self._recover(server)
            try:
                return await begin_update([s.client for s in self._servers if s.healthy])
            except ServerUnavailable:
                if attempt or not self._dead_launched():
                    raise
        raise AssertionError("unreachable")

    def end_distributed_update(self, version: int) -> None:
        from gmpo_megatron.rollout.sglang_distributed import end_update

        try:
            self._run(end_update([s.client for s in self._servers if s.healthy], version))
        except SGLangError as error:
            self.raise_if_a_server_died(version, error)
            raise
        self._version, self._weights = version, None  # no directory holds these weights

    def raise_if_a_server_died(self, version: int, error: BaseException) -> None:
        """After a distributed update to ``version`` failed with ``error``: when a launched server
        died, that is the cause, and the run cannot go on (the half-sent weights are held by no
        directory to restart it from); raise that. Returns when every launched server is alive."""
        dead = self._dead_launched()
        if not dead:
            return
        for server in dead:
            server.healthy = False
        server = dead[0]
        raise SGLangError(
            f"SGLang server {server.url} died (exit code {server.process.exit_code()}) during the weight "
            f"update to version {version} ({type(error).__name__}: {str(error)[:300]}); the weights came by "
            "rollout.sglang.weight_sync=distributed, so no directory holds them to restart it from: use "
            f"weight_sync=disk to have servers restarted. Its log ends with:\n{server.process.log_tail()}"
        ) from None

    def _dead_launched(self) -> list[_Server]:
        return [s for s in self._servers if s.healthy and s.process is not None and not s.process.alive()]

    def health(self) -> EngineHealth:
        return self._run(self._health())

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._close(), timeout=60)
        finally:
            stuck = []
            for server in self._servers:  # every server is stopped, even when one will not die
                if server.process is not None:
                    try:
                        server.process.stop()
                    except RuntimeError as error:
                        stuck.append(str(error))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            if stuck:
                raise SGLangError("; ".join(stuck))

    async def _close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # -- generation ---------------------------------------------------------------------------
    async def _generate_all(self, prompt_ids, sampling, seed, on_result) -> list[Rollout]:
        jobs = [(p, s) for p in range(len(prompt_ids)) for s in range(sampling.n)]
        per_call = self.requests_per_call
        calls = [jobs[i:i + per_call] for i in range(0, len(jobs), per_call)]
        # the in-flight bound counts requests: at most max_in_flight per server (or router)
        servers = 1 if self._router else sum(s.healthy for s in self._servers) or 1
        limit = asyncio.Semaphore(max(1, self.max_in_flight * servers // per_call))
        results: list[Rollout | None] = [None] * len(jobs)

        async def one(first: int, call: list[tuple[int, int]]) -> None:
            async with limit:
                rollouts = await self._generate_call(
                    [(prompt_ids[p], p, s, request_seed(seed, p, s)) for p, s in call], sampling)
            for offset, rollout in enumerate(rollouts):
                results[first + offset] = rollout
                if on_result is not None:
                    on_result(rollout)

        tasks = [asyncio.ensure_future(one(i * per_call, call)) for i, call in enumerate(calls)]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            raise GenerationAborted("generation was aborted (SGLangEngine.abort())") from None
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self._tasks.difference_update(tasks)
        if self._abort.is_set():
            raise GenerationAborted("generation was aborted (SGLangEngine.abort())")
        return results

    async def _generate_call(self, requests: list[tuple[list[int], int, int, int]],
                             sampling: SamplingParams) -> list[Rollout]:
        """One ``/generate`` call carrying ``requests`` [(prompt ids, prompt, sample, seed)]:
        a batch body (lists of input_ids and of sampling_params, one seed each); the server
        schedules its requests independently and answers them in order. A transport failure
        retries (or resubmits) the whole call."""
        want_routes = self.routes is not None
        bodies = [generate_payload(prompt, sampling, seed, return_routed_experts=want_routes)
                  for prompt, _, _, seed in requests]
        body = dict(bodies[0], input_ids=[b["input_ids"] for b in bodies],
                    sampling_params=[b["sampling_params"] for b in bodies])
        attempt = 0
        while True:
            server = self._pick()
            client = self._router or server.client
            server.in_flight += len(requests)
            try:
                answer = await client.generate(body)
                server.failures = 0
            except ServerUnavailable as error:
                server.failures += 1
                server.last_error = str(error)
                attempt += 1
                await self._on_failure(server, error, attempt)
                continue
            finally:
                server.in_flight -= len(requests)
            break
        if not isinstance(answer, list) or len(answer) != len(requests):
            raise BadResponse(f"SGLang server {client.url}: a batch of {len(requests)} requests was answered "
                              f"with {len(answer) if isinstance(answer, list) else type(answer).__name__}")
        rollouts = []
        for entry, (prompt, p, s, _) in zip(answer, requests):
            generation = parse_generation(entry, prompt_len=len(prompt), sampling=sampling,
                                          url=client.url, want_routes=want_routes)
            if generation.weight_version != str(self._version):
                raise BadResponse(
                    f"SGLang server {client.url} generated with weight version "
                    f"{generation.weight_version!r}, the trainer holds {self._version}: the server did "
                    "not take the last weight update (or something else updates it)")
            routes = self.routes.per_layer(generation.routed_experts, client.url) if want_routes else None
            rollouts.append(Rollout(prompt_index=p, sample_index=s, prompt_ids=list(prompt),
                                    response_ids=generation.response_ids,
                                    response_log_probs=generation.log_probs,
                                    finish_reason=generation.finish_reason, routed_experts=routes,
                                    weight_version=self._version))
        return rollouts

    def _pick(self) -> _Server:
        healthy = [s for s in self._servers if s.healthy]
        if not healthy:
            errors = "; ".join(f"{s.url}: {s.last_error}" for s in self._servers)
            raise SGLangError(f"no healthy SGLang server is left ({errors})")
        return min(healthy, key=lambda s: (s.in_flight, s.failures))

    async def _on_failure(self, server: _Server, error: SGLangError, attempt: int) -> None:
        """After a transport failure of a request: restart a dead launched server, drop a dead
        attached one, or back off; raise when the retry bound is spent."""
        if server.process is not None and not server.process.alive():
            await self._recover(server)
            self._counters.resubmitted += 1
            return
        if attempt > self.faults.max_retries:
            if server.process is None and server.healthy and sum(s.healthy for s in self._servers) > 1:
                server.healthy = False  # attached and unresponsive: the others carry on
                self._counters.servers_lost += 1
                self._counters.resubmitted += 1
                return
            raise SGLangError(f"{error} -- still failing after {self.faults.max_retries} retries "
                              "(rollout.sglang.max_retries)")
        self._counters.retries += 1
        await asyncio.sleep(self.faults.retry_backoff_s * 2 ** (attempt - 1))

    async def _recover(self, server: _Server, path: Path | None = None, version: int | None = None) -> None:
        """Restart a launched server that died, from the current weights (or ``path`` at
        ``version`` during an update); one restart at a time."""
        async with server.recovering:
            if server.process.alive():
                return  # another request already restarted it
            code = server.process.exit_code()
            if self._counters.restarts >= self.faults.max_restarts:
                server.healthy = False
                raise SGLangError(
                    f"SGLang server {server.url} died (exit code {code}) and the restart bound "
                    f"rollout.sglang.launch.max_restarts={self.faults.max_restarts} is spent; its log "
                    f"ends with:\n{server.process.log_tail()}")
            if path is None and self._weights is None:
                server.healthy = False
                raise SGLangError(
                    f"SGLang server {server.url} died (exit code {code}); its weights came by "
                    "rollout.sglang.weight_sync=distributed, so no directory holds them to restart it "
                    f"from: use weight_sync=disk to have servers restarted. Its log ends with:\n"
                    f"{server.process.log_tail()}")
            self._counters.restarts += 1
            await self._start(server, path or self._weights, version or self._version)

    async def _start(self, server: _Server, path: Path, version: int) -> None:
        server.process.start(path, version)
        deadline = time.monotonic() + self.faults.startup_timeout_s
        while time.monotonic() < deadline:
            if not server.process.alive():
                raise SGLangError(
                    f"SGLang server {server.url} exited during start-up (exit code "
                    f"{server.process.exit_code()}); its log ({server.process.spec.log_path}) ends "
                    f"with:\n{server.process.log_tail()}")
            if await server.client.ready(timeout_s=5):
                info = await server.client.model_info()
                if info.get("weight_version") != str(version):
                    raise SGLangError(f"SGLang server {server.url} started with weight version "
                                      f"{info.get('weight_version')!r}, expected {version}")
                server.healthy, server.failures, server.last_error = True, 0, ""
                return
            await asyncio.sleep(1.0)
        server.process.stop()
        raise SGLangError(
            f"SGLang server {server.url} did not become healthy within "
            f"rollout.sglang.launch.startup_timeout_s={self.faults.startup_timeout_s:g} s; raise it, or "
            f"read its log ({server.process.spec.log_path}):\n{server.process.log_tail()}")

    # -- weights ------------------------------------------------------------------------------
    async def _update_all(self, path: Path, version: int) -> None:
        if not self._started:
            await asyncio.gather(*(self._start(s, path, version) for s in self._servers))
            self._started = True
        else:
            await asyncio.gather(*(self._update_one(s, path, version) for s in self._servers if s.healthy))
        self._version, self._weights = version, path

    async def _update_one(self, server: _Server, path: Path, version: int) -> None:
        if server.process is not None and not server.process.alive():
            await self._recover(server, path, version)  # a restart loads the new weights directly
            return
        client = server.client
        try:
            await client.pause()
            try:
                await client.control("/update_weights_from_disk", {
                    "model_path": str(path), "weight_version": str(version), "flush_cache": False,
                    "abort_all_requests": False}, timeout_s=self.faults.request_timeout_s)
                await client.flush_cache()
            finally:
                await client.control("/continue_generation", {}, timeout_s=120)
            info = await client.model_info()
        except ServerUnavailable as error:
            if server.process is not None and not server.process.alive():
                await self._update_one(server, path, version)
                return
            raise SGLangError(f"weight update to version {version} failed: {error}") from None
        except RequestRejected as error:
            raise SGLangError(f"weight update to version {version} was refused: {error}; check that "
                              f"{path} holds the server's model (same architecture and shapes)") from None
        if info.get("weight_version") != str(version):
            raise SGLangError(f"SGLang server {server.url} reports weight version "
                              f"{info.get('weight_version')!r} after loading version {version}")

    async def probe_log_probs(self, tokens: list[int]) -> list[list[float]]:
        """Each healthy server's log-probs of ``tokens[1:]`` given the preceding tokens (a prefill
        with ``logprob_start_len=0``): the weight read-back check (``check_weights``)."""
        body = {"input_ids": list(tokens), "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                "return_logprob": True, "logprob_start_len": 0}
        out = []
        for server in self._servers:
            if not server.healthy:
                continue
            answer = await server.client.generate(body)
            entries = (answer or {}).get("meta_info", {}).get("input_token_logprobs") if isinstance(answer, dict) else None
            if not isinstance(entries, list) or len(entries) != len(tokens):
                raise BadResponse(f"SGLang server {server.url}: input_token_logprobs has "
                                  f"{len(entries) if isinstance(entries, list) else entries!r} entries for "
                                  f"{len(tokens)} prompt tokens")
            out.append([float(e[0]) for e in entries[1:]])  # the first token has no log-prob
        return out

    def probe(self, tokens: list[int]) -> list[list[float]]:
        return self._run(self.probe_log_probs(tokens))

    async def _health(self) -> EngineHealth:
        servers = []
        for server in self._servers:
            ok = server.healthy and await server.client.ready()
            version = None
            if ok:
                try:
                    version = (await server.client.model_info()).get("weight_version")
                except SGLangError:
                    ok = False
            servers.append({"url": server.url, "healthy": ok, "weight_version": version,
                            "pid": server.process.pid if server.process else None})
        healthy = all(s["healthy"] for s in servers) and all(
            s["weight_version"] == str(self._version) for s in servers)
        return EngineHealth(healthy, f"{sum(s['healthy'] for s in servers)}/{len(servers)} servers healthy",
                            servers)
