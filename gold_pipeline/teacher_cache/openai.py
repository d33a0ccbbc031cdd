"""OpenAI-compatible completion servers (vLLM serve, SGLang, llama.cpp server) as the teacher, by base URL.

`POST {base_url}/completions` with `logprobs=K`. Such servers return token *strings* and top-logprob maps keyed
by string, not ids, so every answer is mapped back to teacher ids with the teacher tokenizer:

- vLLM: we ask for `return_tokens_as_token_ids` and get "token_id:123" strings: exact ids, nothing to guess;
- otherwise each returned token string is looked up by its exact text; when one of them names several ids
  (see below) the completion text is re-tokenized (`encode_completion`) and must give, position by position,
  the returned token strings (else the row is an error, or a counted skip with --skip-invalid). Alternatives
  in the top-logprob maps are looked up by their exact token text. A string shared by several ids (llama.cpp renders
  special tokens and partial UTF-8 bytes as "") cannot be named: it is dropped (its mass joins the tail) and
  counted as `openai_topk_unnamed`. We ask for K + 4 alternatives so that K named ones remain; a position left
  with fewer is padded with id -1 / log-prob -inf (zero mass) and counted as `openai_topk_padded`.
- Servers that drop the stop token from the log-probs (llama.cpp) give no distribution for it: the row ends
  without the stop id (finish_reason stays "stop") and is counted as `openai_stop_token_unscored`. End-of-turn
  tokens are special (no text bytes), so alignment excludes them from the loss anyway.

The stored log-probs are what the server reports: llama.cpp and vLLM (default logprobs_mode) report the raw
model distribution before temperature/top-p. Requests run in a bounded thread pool with timeouts; connection
errors, timeouts, 408/429 and 5xx are retried with exponential backoff, then the run stops resumably.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from gold_pipeline.errors import BackendUnavailable, GoldInputError
from gold_pipeline.teacher_cache.base import TeacherRequest, TeacherResult

TOKEN_ID_PATTERN = re.compile(r"^token_id:(-?\d+)$")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
LOGPROBS_MARGIN = 4


class ServerResponseError(ValueError):
    """The server's answer cannot give what the cache needs (no log-probs, too few top log-probs, ...)."""


class RowMappingError(ValueError):
    """One completion's token strings do not map back to teacher ids (counted skip with --skip-invalid)."""


# --------------------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------------------


def build_completion_request(
    request: TeacherRequest,
    *,
    model: str,
    top_k: int,
    temperature: float,
    top_p: float,
    sampling_top_k: int,
    max_new_tokens: int,
    prompt_as: str,
    stop_ids: list[int],
    logprobs_margin: int = 0,
) -> dict:
    """The JSON body of one /v1/completions call. prompt_as: "ids" (token ids) or "text" (rendered prompt).

    logprobs_margin: extra alternatives asked for, so that K remain after dropping strings that name no single id.
    """
    if prompt_as == "ids":
        prompt: list[int] | str = list(request.prompt_ids)
    else:
        if request.prompt_text is None:
            raise ValueError(f"Sample {request.sample_id}: a text prompt is needed but none was rendered.")
        prompt = request.prompt_text
    return {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": sampling_top_k,                 # vLLM/SGLang/llama.cpp extension; 0 = off
        "min_p": 0.0,                            # llama.cpp samples with min_p 0.05 / repeat penalty 1.1 by default
        "repeat_penalty": 1.0,
        "repetition_penalty": 1.0,
        "seed": int(request.seed % (2**31 - 1)),
        "logprobs": max(top_k + logprobs_margin, 1),   # K = 0 still needs the token strings to recover ids
        "echo": False,
        "n": 1,
        "stream": False,
        "stop_token_ids": list(stop_ids),        # vLLM extension: also stop at end-of-turn
        "skip_special_tokens": False,            # vLLM: keep special tokens visible in tokens
        "return_tokens_as_token_ids": True,      # vLLM: tokens as "token_id:N" -> exact ids
    }


# --------------------------------------------------------------------------------------------------------------
# Token strings -> ids
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PieceTable:
    """Token text of every teacher id, as servers print single tokens, and the reverse map."""

    pieces: list[str]                  # id -> text (UTF-8 decoded with invalid bytes dropped; specials: "")
    ids_by_piece: dict[str, list[int]]
    special_ids_by_text: dict[str, int]

    def lookup(self, text: str) -> int | None:
        """The single id printed as `text`, or None when no id or several ids print that way."""
        match = TOKEN_ID_PATTERN.match(text)
        if match:
            return int(match.group(1))
        if text in self.special_ids_by_text:
            return self.special_ids_by_text[text]
        ids = self.ids_by_piece.get(normalize_piece(text))
        return ids[0] if ids is not None and len(ids) == 1 else None


def normalize_piece(text: str) -> str:
    """Servers print partial UTF-8 bytes either dropped (llama.cpp) or as U+FFFD (vLLM): drop both."""
    return text.replace("\ufffd", "")


def build_piece_table(tokenizer) -> PieceTable:
    from gold_pipeline.text.bytes import byte_table

    table = byte_table(tokenizer)
    pieces = [normalize_piece(raw.decode("utf-8", errors="ignore")) for raw in table.token_bytes]
    ids_by_piece: dict[str, list[int]] = {}
    for token_id, piece in enumerate(pieces):
        ids_by_piece.setdefault(piece, []).append(token_id)
    specials = {}
    for text, token_id in tokenizer.get_added_vocab().items():
        if token_id < len(pieces) and table.is_special[token_id]:
            specials[text] = token_id
    return PieceTable(pieces, ids_by_piece, specials)


def map_completion_ids(
    tokens: list[str], text: str, finish_reason: str, tokenizer, table: PieceTable, stop_ids: list[int]
) -> tuple[list[int], bool]:
    """Teacher ids of the returned tokens and whether the last one is a stop token the server reported.

    Raises RowMappingError when the tokens cannot be matched to ids.
    """
    from gold_pipeline.text.encode import encode_completion

    direct = [TOKEN_ID_PATTERN.match(t) for t in tokens]
    if tokens and all(direct):
        ids = [int(m.group(1)) for m in direct]          # type: ignore[union-attr]
        return ids, bool(ids) and ids[-1] in stop_ids and finish_reason == "stop"
    stop_last = finish_reason == "stop" and bool(tokens) and table.lookup(tokens[-1]) in stop_ids
    direct_ids = [table.lookup(t) for t in tokens]
    body = direct_ids[:-1] if stop_last else direct_ids
    if all(i is not None for i in body) and "".join(table.pieces[i] for i in body) == normalize_piece(text):
        # every token string names exactly one id and they spell the text: exact, even for a sampled
        # non-canonical tokenization that re-tokenizing the text would not reproduce
        return [int(i) for i in direct_ids], stop_last  # type: ignore[arg-type]
    retokenized = list(encode_completion(tokenizer, text))
    has_stop = False
    if finish_reason == "stop" and len(tokens) == len(retokenized) + 1:
        last = table.lookup(tokens[-1])
        candidates = [last] if last is not None else table.ids_by_piece.get(normalize_piece(tokens[-1]), [])
        stop = next((s for s in stop_ids if s in candidates), None)
        if stop is None:
            raise RowMappingError(
                f"the server returned {len(tokens)} tokens for a text that re-tokenizes to {len(retokenized)}, and "
                f"the extra last token {tokens[-1]!r} is not a stop token"
            )
        tokens, has_stop = tokens[:-1], True
        retokenized = retokenized + [stop]
    check = retokenized[:-1] if has_stop else retokenized
    if len(check) != len(tokens) or any(
        table.pieces[i] != normalize_piece(t) for i, t in zip(check, tokens)
    ):
        mismatch = next((p for p, (i, t) in enumerate(zip(check, tokens)) if table.pieces[i] != normalize_piece(t)),
                        min(len(check), len(tokens)))
        raise RowMappingError(
            f"the completion text does not re-tokenize to the server's tokens (teacher tokenizer: {len(check)} "
            f"tokens, server: {len(tokens)}; first difference at token {mismatch}). The server's tokenizer differs "
            f"from --teacher-tokenizer, or it sampled a non-canonical tokenization"
        )
    return retokenized, has_stop


def topk_from_maps(
    top_maps: list[dict[str, float] | None], ids: list[int], token_logprobs: list[float], k: int, table: PieceTable,
) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(m, K) ids and log-probs from the servers' string-keyed maps; missing slots -> (-1, -inf).

    ids / token_logprobs: the actual token of each position (its key is resolved to the known id).
    Returns (topk_ids, topk_logprobs, unnamed entries dropped, padded slots).
    """
    m = len(ids)
    out_ids = np.full((m, k), -1, dtype=np.int32)
    out_lp = np.full((m, k), -np.inf, dtype=np.float32)
    unnamed = padded = 0
    for position in range(m):
        entries: dict[int, float] = {}
        for key, value in (top_maps[position] or {}).items():
            token_id = table.lookup(key)
            if token_id is None and normalize_piece(key) == table.pieces[ids[position]] and \
                    math.isclose(value, token_logprobs[position], abs_tol=1e-6):
                token_id = ids[position]
            if token_id is None:
                unnamed += 1
                continue
            entries[token_id] = max(value, entries.get(token_id, -math.inf))
        best = sorted(entries.items(), key=lambda item: -item[1])[:k]
        padded += k - len(best)
        for slot, (token_id, value) in enumerate(best):
            out_ids[position, slot] = token_id
            out_lp[position, slot] = value
    return out_ids, out_lp, unnamed, padded


def parse_completion_response(
    response: dict, *, k: int, tokenizer, table: PieceTable, stop_ids: list[int], sample_id: str,
) -> TeacherResult:
    """One /v1/completions answer -> TeacherResult (ids, top-k), or ServerResponseError / RowMappingError."""
    choices = response.get("choices") or []
    if not choices:
        raise ServerResponseError(f"Sample {sample_id}: the server answered without choices: {str(response)[:300]}")
    choice = choices[0]
    text = choice.get("text") or ""
    finish_reason = choice.get("finish_reason") or "length"
    finish_reason = "stop" if finish_reason in ("stop", "eos") else "length"
    logprobs = choice.get("logprobs")
    if not logprobs or logprobs.get("tokens") is None or logprobs.get("token_logprobs") is None:
        raise ServerResponseError(
            "The server returned no log-probs for /v1/completions with logprobs set: it cannot serve as a cached "
            "teacher. Use a server that supports completion log-probs (vLLM serve, SGLang, llama.cpp server)."
        )
    tokens = list(logprobs["tokens"])
    token_lps = [(-math.inf if v is None else float(v)) for v in logprobs["token_logprobs"]]
    top_maps = list(logprobs.get("top_logprobs") or [None] * len(tokens))
    ids, has_stop = map_completion_ids(tokens, text, finish_reason, tokenizer, table, stop_ids)
    stats = {}
    if finish_reason == "stop" and not has_stop:
        stats["openai_stop_token_unscored"] = 1
    m = len(ids)
    token_lps, top_maps = token_lps[:m], top_maps[:m]
    if k > 0 and m > 0:
        sizes = [len(t or {}) for t in top_maps]
        if max(sizes) < k:
            raise ServerResponseError(
                f"The server returned at most {max(sizes)} top log-probs per token, fewer than --top-k {k}: raise "
                f"the server's limit (vLLM: --max-logprobs {k}) or lower --top-k."
            )
    result = TeacherResult(completion_ids=ids, finish_reason=finish_reason, completion_text=text, stats=stats)
    if k > 0:
        result.token_logprobs = np.asarray(token_lps, dtype=np.float32)
        result.topk_ids, result.topk_logprobs, unnamed, padded = topk_from_maps(top_maps, ids, token_lps, k, table)
        if unnamed:
            stats["openai_topk_unnamed"] = unnamed
        if padded:
            stats["openai_topk_padded"] = padded
    return result


# --------------------------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------------------------


class OpenAIBackend:
    name = "openai"

    def __init__(self, *, base_url: str, model: str, tokenizer, top_k: int, stop_ids: list[int],
                 temperature: float = 1.0, top_p: float = 1.0, sampling_top_k: int = 0, max_new_tokens: int = 256,
                 concurrency: int = 4, timeout_s: float = 300.0, max_retries: int = 5, prompt_format: str = "auto",
                 api_key: str | None = None, skip_invalid: bool = False, backoff_s: float = 0.5):
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.stop_ids = list(stop_ids)
        self.sampling = dict(temperature=temperature, top_p=top_p, sampling_top_k=sampling_top_k,
                             max_new_tokens=max_new_tokens)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.prompt_as = "ids" if prompt_format == "auto" else prompt_format
        self.fallback_allowed = prompt_format == "auto"
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.skip_invalid = skip_invalid
        self.backoff_s = backoff_s
        self.logprobs_margin = LOGPROBS_MARGIN if top_k > 0 else 0   # dropped if the server refuses K + margin
        self.table = build_piece_table(tokenizer)
        self._local = threading.local()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg, *, tokenizer, stop_ids: list[int]) -> "OpenAIBackend":
        import os

        return cls(base_url=cfg.base_url, model=cfg.teacher, tokenizer=tokenizer, top_k=cfg.top_k,
                   stop_ids=stop_ids, temperature=cfg.temperature, top_p=cfg.top_p,
                   sampling_top_k=cfg.sampling_top_k, max_new_tokens=cfg.max_new_tokens,
                   concurrency=cfg.concurrency, timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries,
                   prompt_format=cfg.prompt_format, api_key=os.environ.get(cfg.api_key_env),
                   skip_invalid=cfg.skip_invalid)

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def run(self, requests_: list[TeacherRequest]) -> list[TeacherResult | None]:
        """Results in order; None for a row skipped (counted) under --skip-invalid."""
        for request in requests_:
            if request.prompt_text is None:
                request.prompt_text = self.tokenizer.decode(request.prompt_ids, skip_special_tokens=False,
                                                            clean_up_tokenization_spaces=False)
            if request.completion_ids is not None:
                raise GoldInputError("The openai backend does not score given completions (--score-only).")
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, requests_))

    def _one(self, request: TeacherRequest) -> TeacherResult | None:
        response = self.post(request)
        try:
            return parse_completion_response(response, k=self.top_k, tokenizer=self.tokenizer, table=self.table,
                                             stop_ids=self.stop_ids, sample_id=request.sample_id)
        except RowMappingError as error:
            if self.skip_invalid:
                return None
            raise RowMappingError(f"Sample {request.sample_id}: {error}. Point --teacher-tokenizer at the "
                                  f"served model's tokenizer, or pass --skip-invalid to skip and count such "
                                  f"rows.") from error

    def post(self, request: TeacherRequest) -> dict:
        """POST with retries (connection errors, timeouts, 408/429/5xx) and the ids->text prompt fallback."""
        def body_for(prompt_as: str, margin: int) -> dict:
            return build_completion_request(request, model=self.model, top_k=self.top_k, prompt_as=prompt_as,
                                            stop_ids=self.stop_ids, logprobs_margin=margin, **self.sampling)

        def refused(status: int, message: str) -> Exception:
            return ServerResponseError(
                f"The server at {self.url} refused the request for sample {request.sample_id} with HTTP "
                f"{status}: {message}. If it names logprobs, raise the server's log-prob limit or lower --top-k."
            )

        def exhausted(problem: str) -> Exception:
            return BackendUnavailable(f"The server at {self.url} did not answer after {self.max_retries} retries "
                                      f"({problem}).")

        reply = post_with_retries(self, body_for, timeout=self.timeout_s, refused=refused, exhausted=exhausted,
                                  fallback_allowed=self.fallback_allowed)
        return reply.json()


def post_with_retries(client, body_for, *, timeout, refused, exhausted, describe=None, fallback_allowed: bool = True):
    """POST `client.url` until HTTP 200 and return that reply (a requests.Response); the one retry policy of every
    OpenAI-compatible client here (OpenAIBackend, training/teacher_service.TeacherService).

    client: has url, headers, max_retries, backoff_s, _session() (a requests.Session per thread), _lock, and the
        mutable prompt_as ("ids" | "text") and logprobs_margin (int) shared by its threads;
    body_for(prompt_as, margin) -> the JSON body;
    refused(status, message) -> the exception for a refusal that is not retried (4xx other than 408/409/425/429);
    exhausted(problem) -> the exception once max_retries retries have failed;
    describe(error) -> a short reason for a connection error or timeout (default: type and message).
    Connection errors, timeouts and RETRY_STATUS are retried with exponential backoff (capped at 30 s). Two
    refusals switch the client instead, then retry at once: a server that takes text prompts only (llama.cpp:
    400/422/500 naming the prompt) -> prompt_as "text" (only when fallback_allowed); a log-prob limit between K and
    K + margin (400/422 naming logprobs) -> margin 0.
    """
    import requests

    attempt = 0
    while True:
        with client._lock:
            prompt_as, margin = client.prompt_as, client.logprobs_margin
        body = body_for(prompt_as, margin)
        try:
            reply = client._session().post(client.url, data=json.dumps(body), headers=client.headers, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as error:
            problem = describe(error) if describe else f"{type(error).__name__}: {error}"
        else:
            if reply.status_code == 200:
                return reply
            message = reply.text[:500]
            if reply.status_code in (400, 422, 500) and prompt_as == "ids" and fallback_allowed and \
                    "prompt" in message.lower():
                with client._lock:
                    client.prompt_as = "text"       # this server takes text prompts only
                continue
            if reply.status_code in (400, 422) and margin > 0 and "logprob" in message.lower():
                with client._lock:
                    client.logprobs_margin = 0      # the server's limit is between K and K + margin
                continue
            if reply.status_code not in RETRY_STATUS:
                raise refused(reply.status_code, message)
            problem = f"HTTP {reply.status_code}: {message}"
        attempt += 1
        if attempt > client.max_retries:
            raise exhausted(problem)
        time.sleep(min(30.0, client.backoff_s * 2 ** (attempt - 1)))
