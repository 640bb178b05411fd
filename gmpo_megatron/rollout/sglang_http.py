"""SGLang's HTTP contract, as this project uses it: request bodies, response parsing, one server.

Read from the sglang 0.5.21 wheel (``srt/entrypoints/http_server.py``, ``srt/managers/io_struct.py``,
``srt/managers/tokenizer_manager.py``) and checked against a real 0.5.21 server on CPU
(``tests/rollout/test_sglang_server.py``). 0.5.23 rejects unknown ``sampling_params`` keys with HTTP
400 (0.5.21 fails them with a 500), so a request carries only the keys in ``SAMPLING_KEYS``.

``POST /generate`` with ``input_ids`` (one prompt) answers ``{"text", "output_ids", "meta_info"}``:

- ``output_ids`` [R]: the response tokens; a matched stop token is the last of them;
- ``meta_info.finish_reason``: ``{"type": "stop", "matched": id | str}``, ``{"type": "length",
  "length": R}`` or ``{"type": "abort", "message": ...}``;
- ``meta_info.output_token_logprobs`` (``return_logprob``): ``[[logprob, token_id, text|null], ...]``,
  one per response token; by default ``log softmax(logits / T)`` (temperature applied; the
  trainer recomputes ``log_softmax(logits / T)``). The server must NOT run with
  ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, which returns the log-probs before temperature;
- ``meta_info.weight_version``: the version string of the weights that generated the response;
- ``meta_info.routed_experts`` (``return_routed_experts``, server flag
  ``--enable-return-routed-experts``): base64 of little-endian int32
  ``[prompt_len + response_len - 1, num_layers, top_k]``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gmpo_megatron.rollout.engine import SamplingParams

# The sampling_params keys we may send (all accepted by 0.5.21 through 0.5.23).
SAMPLING_KEYS = frozenset({
    "max_new_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
    "ignore_eos", "n", "sampling_seed", "skip_special_tokens", "no_stop_trim",
})
# The top-level /generate keys we may send.
GENERATE_KEYS = frozenset({
    "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "return_routed_experts",
    "rid", "stream",
})


class SGLangError(RuntimeError):
    """A failure talking to an SGLang server; the message names the server and what to do."""


class ServerUnavailable(SGLangError):
    """Connection refused or reset, a timeout, or a 5xx: the request may succeed on a retry."""


class RequestRejected(SGLangError):
    """A 4xx: the server refused the request itself; retrying cannot help."""


class BadResponse(SGLangError):
    """A response that breaks the contract (malformed, aborted, short, wrong weight version)."""


def generate_payload(prompt_ids: list[int], sampling: SamplingParams, seed: int, *,
                     return_routed_experts: bool = False, rid: str | None = None) -> dict[str, Any]:
    """The /generate body of ONE sample (n=1) of ``prompt_ids`` with sampling seed ``seed``."""
    params: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        # SGLang spells "no top-k" as -1 (0 would be rejected)
        "top_k": sampling.top_k if sampling.top_k > 0 else -1,
        # SGLang also stops on the model's own EOS ids (``ignore_eos`` would switch off
        # stop_token_ids as well); the trainer puts those ids in stop_token_ids for every engine.
        "stop_token_ids": list(sampling.stop_token_ids),
        "skip_special_tokens": False,
        "n": 1,
    }
    if not sampling.greedy:
        params["sampling_seed"] = int(seed)
    assert set(params) <= SAMPLING_KEYS, set(params) - SAMPLING_KEYS
    body: dict[str, Any] = {"input_ids": list(prompt_ids), "sampling_params": params,
                            "return_logprob": True, "logprob_start_len": -1}
    if return_routed_experts:
        body["return_routed_experts"] = True
    if rid is not None:
        body["rid"] = rid
    assert set(body) <= GENERATE_KEYS, set(body) - GENERATE_KEYS
    return body


@dataclass
class Generation:
    """One parsed /generate response."""

    response_ids: list[int]
    log_probs: list[float]
    finish_reason: str  # "stop" | "length"
    weight_version: str
    routed_experts: np.ndarray | None  # [prompt_len + response_len - 1, num_layers, top_k] int32


def parse_generation(body: Any, *, prompt_len: int, sampling: SamplingParams, url: str,
                     want_routes: bool) -> Generation:
    """Check one /generate response against the contract; anything else is a ``BadResponse``
    (an aborted or malformed response is never turned into a short sample)."""
    where = f"SGLang server {url}"
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise BadResponse(f"{where}: /generate answered {_preview(body)}, not an object with "
                          "output_ids and meta_info")
    meta = body["meta_info"]
    finish = meta.get("finish_reason")
    kind = finish.get("type") if isinstance(finish, dict) else None
    if kind == "abort":
        raise BadResponse(f"{where}: the request was aborted by the server ({finish.get('message')!r}); "
                          "a partial response is not a sample")
    if kind not in ("stop", "length"):
        raise BadResponse(f"{where}: unknown finish_reason {finish!r}")
    ids = body.get("output_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise BadResponse(f"{where}: output_ids is {_preview(ids)}, not a list of token ids")
    if not ids:
        raise BadResponse(f"{where}: an empty response (finish_reason {finish!r})")
    if len(ids) > sampling.max_new_tokens:
        raise BadResponse(f"{where}: {len(ids)} tokens, more than max_new_tokens={sampling.max_new_tokens}")
    if kind == "length" and len(ids) != sampling.max_new_tokens:
        raise BadResponse(f"{where}: finish_reason length after {len(ids)} of "
                          f"{sampling.max_new_tokens} tokens")
    if kind == "stop" and finish.get("matched") != ids[-1]:
        raise BadResponse(f"{where}: finish_reason stop matched {finish.get('matched')!r}, not the last "
                          f"token {ids[-1]}: only stop tokens are expected (no stop strings are sent)")
    entries = meta.get("output_token_logprobs")
    if not isinstance(entries, list) or len(entries) != len(ids):
        raise BadResponse(f"{where}: output_token_logprobs has {len(entries) if isinstance(entries, list) else entries!r} "
                          f"entries for {len(ids)} tokens (was return_logprob dropped?)")
    log_probs = []
    for position, (entry, token) in enumerate(zip(entries, ids)):
        if not (isinstance(entry, (list, tuple)) and len(entry) >= 2 and entry[1] == token
                and isinstance(entry[0], (int, float)) and math.isfinite(entry[0]) and entry[0] <= 1e-4):
            raise BadResponse(f"{where}: output_token_logprobs[{position}] = {_preview(entry)} does not "
                              f"hold a finite log-prob of token {token}")
        log_probs.append(float(min(entry[0], 0.0)))
    version = meta.get("weight_version")
    if not isinstance(version, str):
        raise BadResponse(f"{where}: meta_info has no weight_version (got {version!r})")
    routes = None
    if want_routes:
        routes = decode_routed_experts(meta.get("routed_experts"), prompt_len + len(ids) - 1, url)
    return Generation(ids, log_probs, kind, version, routes)


def decode_routed_experts(encoded: Any, positions: int, url: str) -> np.ndarray:
    """``meta_info.routed_experts`` -> int32 ``[positions, num_layers, top_k]``."""
    if not isinstance(encoded, str):
        raise BadResponse(
            f"SGLang server {url}: no routed_experts in the response (got {type(encoded).__name__}); "
            "R3 needs the server started with --enable-return-routed-experts (rollout.sglang.launch "
            "adds it when moe.routing_replay=r3)")
    try:
        flat = np.frombuffer(base64.b64decode(encoded, validate=True), dtype="<i4")
    except (ValueError, TypeError) as error:
        raise BadResponse(f"SGLang server {url}: routed_experts is not base64 int32 ({error})") from None
    if positions <= 0 or flat.size % positions:
        raise BadResponse(f"SGLang server {url}: {flat.size} routed expert ids do not split into "
                          f"{positions} positions (prompt + response - 1)")
    return flat.reshape(positions, -1)


def _preview(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class ServerClient:
    """Async calls to one SGLang server (``url`` like ``http://127.0.0.1:30000``) over a shared
    ``aiohttp.ClientSession``. Transport failures and 5xx raise ``ServerUnavailable``, 4xx
    ``RequestRejected`` with the server's own message; retry policy is the caller's."""

    def __init__(self, url: str, session, timeout_s: float) -> None:
        self.url = url.rstrip("/")
        self._session = session
        self.timeout_s = timeout_s

    async def request(self, method: str, path: str, body: Any = None,
                      timeout_s: float | None = None) -> Any:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._session.request(method, self.url + path, json=body, timeout=timeout) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            raise ServerUnavailable(f"SGLang server {self.url}{path}: {type(error).__name__}: {error}") from None
        if status >= 500:
            raise ServerUnavailable(f"SGLang server {self.url}{path}: HTTP {status}: {text[:500]}")
        if status >= 400:
            raise RequestRejected(f"SGLang server {self.url}{path} refused the request: HTTP {status}: "
                                  f"{_server_message(text)}")
        try:
            return json.loads(text) if text else None
        except json.JSONDecodeError:
            return text  # e.g. /flush_cache answers plain text

    async def generate(self, body: dict) -> Any:
        return await self.request("POST", "/generate", body)

    async def model_info(self) -> dict:
        info = await self.request("GET", "/model_info", timeout_s=30)
        if not isinstance(info, dict):
            raise BadResponse(f"SGLang server {self.url}/model_info answered {_preview(info)}")
        return info

    async def ready(self, timeout_s: float = 10) -> bool:
        """The cheap readiness check: ``/ready`` (newer servers' ``/health`` runs a one-token
        generation, which stalls while generation is paused for a weight update); ``/health``
        for servers without ``/ready``."""
        try:
            await self.request("GET", "/ready", timeout_s=timeout_s)
            return True
        except RequestRejected:  # no /ready route
            pass
        except SGLangError:
            return False
        try:
            await self.request("GET", "/health", timeout_s=timeout_s)
            return True
        except SGLangError:
            return False

    async def pause(self) -> None:
        """Pause generation in ``retract`` mode: unfinished requests go back to the queue and the
        running batch is emptied. (``in_place`` keeps finished requests the scheduler has not
        released yet in the running batch, so a cache flush fails, and sglang 0.5.21's weight
        update asserts on a failed flush and kills the server: seen on CPU.)"""
        await self.control("/pause_generation", {"mode": "retract"}, timeout_s=120)

    async def flush_cache(self, timeout_s: float = 60.0) -> None:
        """Flush the prefix cache, retrying while the server still holds requests (it refuses
        with HTTP 400 then); weight updates send ``flush_cache=false`` and call this after."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            try:
                await self.request("POST", "/flush_cache", timeout_s=60)
                return
            except RequestRejected as error:
                if asyncio.get_running_loop().time() > deadline:
                    raise RequestRejected(f"{error} -- the server kept requests for {timeout_s:g} s, so "
                                          "its prefix cache (old weights' KV) could not be flushed; is "
                                          "another client generating on it?") from None
                await asyncio.sleep(0.2)

    async def control(self, path: str, body: dict | None = None, timeout_s: float = 600) -> Any:
        """A control call whose answer may carry ``success: false`` (weight updates)."""
        answer = await self.request("POST", path, body if body is not None else {}, timeout_s=timeout_s)
        if isinstance(answer, dict) and answer.get("success") is False:
            raise RequestRejected(f"SGLang server {self.url}{path} failed: {answer.get('message')}")
        return answer


def _server_message(text: str) -> str:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])[:500]
        if "detail" in body:
            return str(body["detail"])[:500]
    return text[:500]
