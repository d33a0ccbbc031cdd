"""The teacher as a service during training: an OpenAI-compatible server (vLLM serve, SGLang, llama.cpp server)
scores the teacher side of every on-policy completion, so the teacher need not fit beside the student.

One `POST {base_url}/completions` per completion with `echo=true`, `max_tokens=1` (llama.cpp reads 0 as "no
limit"), `temperature=0` and `logprobs=K (+4)`, the prompt being the teacher-side ids of prompt + completion
(or their text for servers that only take text, llama.cpp). The echoed prompt log-probs at the completion
positions give, per teacher completion token, the top-K ids/log-probs and the actual token's log-prob: the same
(Nt, K) / (Nt,) tensors as cached top-K (training/collate.py), so the loss code is unchanged. Token strings are
mapped back to ids with teacher_cache/openai.py (PieceTable, topk_from_maps): one owner for that.

Before training, `probe` checks the server against references:
- the served model exists; a tokenizer fingerprint, when the server declares one (`tokenizer_fingerprint` in its
  /v1/models entry), equals the teacher tokenizer's; otherwise a probe text re-tokenized by the server
  (vLLM `/tokenize`, llama.cpp `/extras/tokenize`) and the echoed token strings must give the teacher
  tokenizer's ids; a difference is refused, naming the first differing token;
- its log-probs on a probe completion, after a chat-rendered prompt (the kind training sends) and after a plain
  prompt that starts with another token, agree with a forward pass of a local teacher when one is given, read
  both *aligned* (the entry of token i holds log p(token i | tokens < i), the OpenAI convention, vLLM) and
  *shifted by one* (the entry of token i holds the distribution of the NEXT token: llama-cpp-python 0.3.36 on
  every prompt that does not start with its BOS token, which it drops from the echo). The reading that agrees is
  kept, per kind of prompt where the two differ (keyed by the first prompt token), and a shifted server is
  **corrected**, not refused: the distribution of completion token i is read from the entry before it, and the
  actual token's log-prob from that entry's top map; when the token is not among the reported alternatives the
  server never sent its log-prob, so an upper bound (the K+4-th reported log-prob or the tail mass, whichever is
  smaller) stands in and is counted (`counter/teacher_service_token_logprob_bounded`). Without a local teacher
  the reading is the one that predicts the probe's (highly predictable) completion, or it is declared with
  `teacher_server_alignment`. A server that matches neither reading is refused.

Failures: a server that cannot be reached fails at startup within (retries x timeout + backoff) seconds naming
its address (BackendUnavailable); one that stops answering mid-run is retried `teacher_server_retries` times with
exponential backoff, then training stops cleanly (BackendUnavailable) saying to rerun with
`--resume-from-checkpoint latest`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from gold_pipeline.errors import BackendUnavailable, GoldInputError
from gold_pipeline.teacher_cache.openai import (
    LOGPROBS_MARGIN,
    TOKEN_ID_PATTERN,
    PieceTable,
    build_piece_table,
    normalize_piece,
    post_with_retries,
    topk_from_maps,
)
from gold_pipeline.text.encode import encode_completion, end_of_turn_ids, render_prompt_ids

logger = logging.getLogger(__name__)

ALIGNMENTS = ("auto", "aligned", "shifted")
PROBE_MODES = ("auto", "tokens", "off")
SHIFT_OF = {"aligned": 0, "shifted": 1}
PROBE_QUESTION = "Count from 1 to 20, separated by commas."
PROBE_ANSWER = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20"
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Café naïve — 12345!"
# mean |server - local forward| (nats) a reading must stay under; llama.cpp Q4_1 vs transformers measured 0.07
PROBE_MEAN_TOL = 0.5
PROBE_RATIO = 2.0          # the other reading must be this many times worse (or predict this many times less)
RESUME_HINT = ("Training stopped; the last checkpoint in output_dir is kept: rerun the same command with "
               "--resume-from-checkpoint latest (GOLDConfig.resume_from_checkpoint) once the server answers.")


def _json_or_none(reply):
    """A 200 answer's JSON, else None (an optional endpoint that is missing, refuses or answers non-JSON)."""
    if reply.status_code != 200:
        return None
    try:
        return reply.json()
    except ValueError:
        return None


@dataclass
class ServedScores:
    """The teacher's scores of one completion (m teacher tokens)."""

    topk_ids: np.ndarray          # (m, K) int64, -1 where fewer than K alternatives were named
    topk_logprobs: np.ndarray     # (m, K) float32, -inf at those slots
    token_logprobs: np.ndarray    # (m,) float32, log p(actual token i | prompt, tokens < i)
    bounded: np.ndarray | None = None   # (m,) bool: actual-token log-prob not reported, upper bound used

    @property
    def num_bounded(self) -> int:
        return 0 if self.bounded is None else int(self.bounded.sum())


@dataclass
class _Echo:
    """The echoed entries of one /v1/completions answer: prompt entries only (the generated one dropped)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    maps: list[dict[str, float] | None]


@dataclass
class ProbeReport:
    alignment: str
    checks: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)      # reading -> mean |Δ| nats vs the local forward
    hits: dict[str, float] = field(default_factory=dict)        # reading -> share of probe tokens predicted (top-1)
    plain_errors: dict[str, float] = field(default_factory=dict)    # the same for the plain (template-less) prompt
    plain_hits: dict[str, float] = field(default_factory=dict)
    by_first: dict[int, str] = field(default_factory=dict)      # first prompt id -> reading, where it differs


class TeacherService:
    """Client of an OpenAI-compatible server that scores teacher-side completions (see module docstring)."""

    def __init__(self, *, base_url: str, model: str | None, tokenizer, top_k: int, timeout_s: float = 60.0,
                 max_retries: int = 3, backoff_s: float = 0.5, concurrency: int = 4, alignment: str = "auto",
                 api_key: str | None = None):
        if alignment not in ALIGNMENTS:
            raise GoldInputError(f"teacher_server_alignment={alignment!r}: must be one of {ALIGNMENTS}.")
        self.base_url = base_url.rstrip("/")
        self.root_url = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        self.url = self.base_url + "/completions"
        self.model = model
        self.tokenizer = tokenizer
        self.top_k = top_k
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.concurrency = concurrency
        self.shift = SHIFT_OF.get(alignment)        # None until the probe decides
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.table: PieceTable = build_piece_table(tokenizer)
        self.prompt_as = "ids"                      # -> "text" when the server takes text prompts only
        self.logprobs_margin = LOGPROBS_MARGIN      # -> 0 when the server refuses K + margin
        self.shift_by_first: dict[int, int] = {}    # first prompt id -> shift, where it differs from self.shift
        self._local = threading.local()
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, args, tokenizer) -> "TeacherService":
        import os

        return cls(base_url=args.teacher_server_url, model=args.teacher_server_model, tokenizer=tokenizer,
                   top_k=args.teacher_server_top_k, timeout_s=args.teacher_server_timeout,
                   max_retries=args.teacher_server_retries, concurrency=args.teacher_server_concurrency,
                   alignment=args.teacher_server_alignment,
                   api_key=os.environ.get(args.teacher_server_api_key_env) if args.teacher_server_api_key_env
                   else None)

    # ------------------------------------------------------------------------------------------------------
    # HTTP
    # ------------------------------------------------------------------------------------------------------

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def _timeout(self) -> tuple[float, float]:
        return min(10.0, self.timeout_s), self.timeout_s     # (connect, read)

    def _get(self, url: str):
        """GET, None on 404/405 or a non-JSON answer; connection problems raise requests' errors."""
        return _json_or_none(self._session().get(url, headers=self.headers, timeout=self._timeout()))

    def _post_json(self, url: str, body: dict):
        """One POST without retries; None when the endpoint does not exist or refuses (optional endpoints)."""
        import requests

        try:
            reply = self._session().post(url, data=json.dumps(body), headers=self.headers, timeout=self._timeout())
        except (requests.ConnectionError, requests.Timeout):
            return None
        return _json_or_none(reply)

    def _score_body(self, ids: list[int], prompt_as: str, margin: int) -> dict:
        prompt: list[int] | str = list(ids) if prompt_as == "ids" else self.tokenizer.decode(
            list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 1,                  # 0 means "until the context is full" to llama.cpp
            "temperature": 0.0,
            "logprobs": max(self.top_k + margin, 1),
            "echo": True,                     # prompt log-probs
            "n": 1,
            "stream": False,
            "add_special_tokens": False,      # vLLM: no BOS added to a text prompt (it already has its own)
            "skip_special_tokens": False,
            "return_tokens_as_token_ids": True,   # vLLM: "token_id:N" strings, exact ids
        }

    def _post_score(self, ids: list[int], what: str, hint: str) -> dict:
        """POST a scoring request with teacher_cache/openai.py's retry policy (post_with_retries)."""
        def refused(status: int, message: str) -> Exception:
            return GoldInputError(
                f"The teacher server at {self.url} refused {what} with HTTP {status}: {message}. If it names "
                f"logprobs, raise the server's log-prob limit (vLLM: --max-logprobs {self.top_k + LOGPROBS_MARGIN}) "
                f"or lower teacher_server_top_k."
            )

        def exhausted(problem: str) -> Exception:
            return BackendUnavailable(
                f"The teacher server at {self.url} did not answer {what} after {self.max_retries} retries "
                f"(timeout {self.timeout_s:g} s each; last: {problem[:300]}). {hint}"
            )

        reply = post_with_retries(self, lambda prompt_as, margin: self._score_body(ids, prompt_as, margin),
                                  timeout=self._timeout(), refused=refused, exhausted=exhausted,
                                  describe=lambda error: _describe(error, self.timeout_s))
        try:
            return reply.json()
        except ValueError:
            raise GoldInputError(f"The teacher server at {self.url} answered {what} with something that is not "
                                 f"JSON: {reply.text[:300]!r}.") from None

    # ------------------------------------------------------------------------------------------------------
    # Echo answers -> scores
    # ------------------------------------------------------------------------------------------------------

    def _echo(self, response: dict, n_ids: int, completion_ids: list[int], what: str) -> _Echo:
        """The prompt entries of an echo answer, with the completion's entries verified to be our tokens."""
        choices = response.get("choices") or []
        logprobs = choices[0].get("logprobs") if choices else None
        if not logprobs or logprobs.get("tokens") is None or logprobs.get("token_logprobs") is None:
            raise GoldInputError(
                f"The teacher server at {self.url} returned no prompt log-probs for {what} (echo=true, logprobs="
                f"{self.top_k}): it cannot score completions. Use vLLM serve, SGLang or the llama.cpp server."
            )
        tokens = list(logprobs["tokens"])
        lps = list(logprobs["token_logprobs"])
        maps = list(logprobs.get("top_logprobs") or [None] * len(tokens))
        usage = (response.get("usage") or {}).get("completion_tokens")
        # the generated token (max_tokens=1) ends the list, unless it was a stop token some servers leave out
        # (llama.cpp); `usage` is tried first, then both
        generated = list(dict.fromkeys(([int(usage)] if isinstance(usage, int) and 0 <= usage <= 1 else []) + [1, 0]))
        m = len(completion_ids)
        last_problem = ""
        for gen in generated:
            n = len(tokens) - gen
            if n < m + 1:
                last_problem = f"{n} echoed prompt tokens for {n_ids} sent"
                continue
            mismatch = self._first_mismatch(tokens[n - m: n], completion_ids)
            if mismatch is None:
                return _Echo(tokens[:n], lps[:n], maps[:n])
            i, theirs = mismatch
            last_problem = (f"completion token {i}: the server has {theirs!r}, the teacher tokenizer id "
                            f"{completion_ids[i]} ({self.table.pieces[completion_ids[i]]!r})")
        raise GoldInputError(
            f"The teacher server at {self.url} scored other tokens than the teacher tokenizer gives for {what} "
            f"({last_problem}). The served model's tokenizer differs from the teacher tokenizer, or a server that "
            f"takes text prompts re-tokenized the text differently (vLLM and SGLang take token ids)."
        )

    def _first_mismatch(self, server_tokens: list[str], ids: list[int]) -> tuple[int, str] | None:
        for i, (text, token_id) in enumerate(zip(server_tokens, ids)):
            direct = TOKEN_ID_PATTERN.match(text)
            if direct:
                if int(direct.group(1)) != token_id:
                    return i, text
            elif normalize_piece(text) != self.table.pieces[token_id]:
                return i, text
        return None

    def _lookup_in(self, entry: dict[str, float] | None, token_id: int) -> float | None:
        """The log-prob of `token_id` in a string-keyed top map, or None when it is not there."""
        if not entry:
            return None
        piece = self.table.pieces[token_id]
        found = None
        for key, value in entry.items():
            named = self.table.lookup(key)
            if named == token_id or (named is None and normalize_piece(key) == piece and not
                                     TOKEN_ID_PATTERN.match(key)):
                found = value if found is None else max(found, value)
        return found

    def _read(self, echo: _Echo, completion_ids: list[int], shift: int) -> ServedScores:
        """Scores of the completion (the last m prompt entries) under one reading (shift 0 or 1)."""
        m, n = len(completion_ids), len(echo.tokens)
        maps, lps, bounded = [], [], np.zeros(m, dtype=bool)
        requested = self.top_k + self.logprobs_margin
        for i in range(m):
            j = n - m + i                      # entry of completion token i
            entry = echo.maps[j - shift]
            if entry is None:
                raise GoldInputError(f"The teacher server at {self.url} sent no log-probs for the token before the "
                                     "completion (a one-token prompt?).")
            lp = echo.token_logprobs[j] if shift == 0 else self._lookup_in(entry, completion_ids[i])
            if lp is None:
                values = sorted(entry.values(), reverse=True)
                tail = 1.0 - sum(math.exp(v) for v in values)
                bound = values[min(requested, len(values)) - 1]
                lp = min(bound, math.log(tail) if tail > 0 else bound)
                bounded[i] = True
            maps.append(entry)
            lps.append(float(lp))
        topk_ids, topk_lps, _, _ = topk_from_maps(maps, list(completion_ids), lps, self.top_k, self.table)
        return ServedScores(topk_ids.astype(np.int64), topk_lps.astype(np.float32),
                            np.asarray(lps, dtype=np.float32), bounded)

    # ------------------------------------------------------------------------------------------------------
    # Scoring
    # ------------------------------------------------------------------------------------------------------

    def score(self, prompt_ids: list[int], completion_ids: list[int], *, what: str = "a completion") -> ServedScores:
        """Top-K ids/log-probs and actual-token log-probs at every completion position (after `probe`)."""
        if self.shift is None:
            raise RuntimeError("TeacherService.score before probe(): the alignment of the server is not known.")
        completion_ids = [int(i) for i in completion_ids]
        if not completion_ids:
            k = self.top_k
            return ServedScores(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32))
        ids = [int(i) for i in prompt_ids] + completion_ids
        response = self._post_score(ids, what, RESUME_HINT)
        echo = self._echo(response, len(ids), completion_ids, what)
        return self._read(echo, completion_ids, self.shift_by_first.get(ids[0], self.shift))

    def score_many(self, prompts: list[list[int]], completions: list[list[int]],
                   names: list[str] | None = None) -> list[ServedScores]:
        """`score` for many rows, `concurrency` requests at a time, in order."""
        names = names or [f"row {b}" for b in range(len(prompts))]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(prompts)))) as pool:
            return list(pool.map(lambda args: self.score(args[0], args[1], what=args[2]),
                                 zip(prompts, completions, names)))

    # ------------------------------------------------------------------------------------------------------
    # The startup probe
    # ------------------------------------------------------------------------------------------------------

    def probe(self, reference_model=None, mode: str = "auto") -> ProbeReport:
        """Check the server (module docstring) and fix the alignment; raises on a server that cannot be used.

        reference_model: a local teacher (transformers causal LM) whose forward pass is the reference, or None.
        mode: "auto" (every check), "tokens" (no forward-pass comparison), "off" (alignment must be declared).
        """
        import requests

        if mode not in PROBE_MODES:
            raise GoldInputError(f"teacher_server_probe={mode!r}: must be one of {PROBE_MODES}.")
        report = ProbeReport(alignment="")
        startup_hint = ("Start the server (it must serve /v1/completions with log-probs) or fix "
                        "teacher_server_url, then rerun.")
        try:
            listed = self._get(self.base_url + "/models")
        except (requests.ConnectionError, requests.Timeout) as error:
            # /models first: a dead address fails here, after max_retries quick retries
            listed = None
            last = _describe(error, self.timeout_s)
            for attempt in range(self.max_retries):
                time.sleep(min(30.0, self.backoff_s * 2 ** attempt))
                try:
                    listed = self._get(self.base_url + "/models")
                    break
                except (requests.ConnectionError, requests.Timeout) as again:
                    last = _describe(again, self.timeout_s)
            else:
                raise BackendUnavailable(f"The teacher server at {self.base_url} cannot be reached after "
                                         f"{self.max_retries} retries ({last}). {startup_hint}") from None
        self._check_models(listed, report)
        if mode == "off":
            if self.shift is None:
                raise GoldInputError("teacher_server_probe='off' needs teacher_server_alignment 'aligned' or "
                                     "'shifted' (the probe is what detects it).")
            report.alignment = "aligned" if self.shift == 0 else "shifted"
            return report
        self._check_tokenizer(report)
        tok = self.tokenizer
        use_forward = reference_model is not None and mode == "auto"
        completion_ids = list(encode_completion(tok, PROBE_ANSWER)) + list(end_of_turn_ids(tok))
        # two prompts: the chat-rendered kind training sends, and a plain one starting with another token (the
        # llama.cpp server lines up only prompts that start with its BOS, which it drops)
        chat_prompt = list(render_prompt_ids(tok, [{"role": "user", "content": PROBE_QUESTION}]))
        plain_prompt = list(encode_completion(tok, PROBE_QUESTION + "\n"))
        name, clear, detail = self._probe_reading(chat_prompt, completion_ids, reference_model, use_forward,
                                                  report.errors, report.hits, startup_hint)
        report.checks.append(f"echoed probe tokens match the teacher tokenizer ({len(completion_ids)} tokens)")
        plain = None
        if plain_prompt and chat_prompt and plain_prompt[0] != chat_prompt[0]:
            plain = self._probe_reading(plain_prompt, completion_ids, reference_model, use_forward,
                                        report.plain_errors, report.plain_hits, startup_hint)
        declared = {0: "aligned", 1: "shifted"}.get(self.shift) if self.shift is not None else None
        if declared is not None:
            if use_forward and report.errors[declared] >= PROBE_MEAN_TOL:
                raise GoldInputError(
                    f"The teacher server at {self.base_url} does not give the local teacher's log-probs read "
                    f"{declared} (teacher_server_alignment): {detail}. Serve the same model as the teacher, or "
                    "fix teacher_server_alignment.")
            report.alignment = declared
            report.checks.append(f"alignment {declared} (declared): {detail}")
            return report
        for ok, what in ((clear, detail), (plain[1] if plain else True, plain[2] if plain else "")):
            if not ok:
                raise GoldInputError(
                    f"The teacher server at {self.base_url} gives prompt log-probs that match neither reading of "
                    f"the probe ({what}): refused. Serve the same model as the local teacher, or set "
                    "teacher_server_alignment to 'aligned' or 'shifted' (and teacher_server_probe='tokens') if "
                    "you know it.")
        report.alignment = name
        self.shift = SHIFT_OF[name]
        report.checks.append(f"alignment {name} for chat prompts: {detail}")
        if plain is not None and plain[0] != name:
            # the reading depends on the first prompt token: the chat kind as probed, everything else as plain
            self.shift_by_first = {chat_prompt[0]: SHIFT_OF[name]}
            self.shift = SHIFT_OF[plain[0]]
            report.by_first = {chat_prompt[0]: name}
            report.checks.append(f"alignment {plain[0]} for prompts not starting with id {chat_prompt[0]}: "
                                 f"{plain[2]}")
        if "shifted" in (name, plain[0] if plain else name):
            logger.warning(
                "The teacher server at %s reports echoed prompt log-probs shifted by one position for some prompts "
                "(%s; the llama.cpp server does this unless the prompt starts with its BOS): corrected by reading "
                "each token's distribution from the entry before it; actual-token log-probs it did not report are "
                "replaced by an upper bound and counted as counter/teacher_service_token_logprob_bounded.",
                self.base_url, "; ".join(report.checks[-2:]))
        else:
            logger.info("The teacher server at %s passed the probe (%s).", self.base_url, detail)
        return report

    def _probe_reading(self, prompt_ids: list[int], completion_ids: list[int], reference_model, use_forward: bool,
                       errors: dict, hits: dict, hint: str) -> tuple[str, bool, str]:
        """Score the probe and read it both ways: (best reading, whether it is clearly the right one, detail);
        fills `errors` (vs the local forward) and `hits` (top-1 predictions of the probe completion)."""
        ids = prompt_ids + completion_ids
        response = self._post_score(ids, "the startup probe", hint)
        echo = self._echo(response, len(ids), completion_ids, "the startup probe")
        readings = {name: self._read(echo, completion_ids, shift) for name, shift in SHIFT_OF.items()}
        body = len(completion_ids) - len(end_of_turn_ids(self.tokenizer))   # the predictable part
        for name, scores in readings.items():
            hits[name] = float(np.mean(scores.topk_ids[:body, 0] == np.asarray(completion_ids[:body])))
        if use_forward:
            reference = reference_logprobs(reference_model, prompt_ids, completion_ids)   # (m, V)
            for name, scores in readings.items():
                errors[name] = mean_abs_error(scores, reference, completion_ids)
            best = min(errors, key=errors.get)
            other = "shifted" if best == "aligned" else "aligned"
            clear = errors[best] < PROBE_MEAN_TOL and errors[other] > PROBE_RATIO * errors[best]
            detail = (f"mean |server - local forward| aligned {errors['aligned']:.3f}, shifted "
                      f"{errors['shifted']:.3f} nats")
        else:
            best = max(hits, key=hits.get)
            other = "shifted" if best == "aligned" else "aligned"
            clear = hits[best] >= 0.5 and hits[best] > PROBE_RATIO * hits[other]
            detail = f"probe tokens predicted (top-1) aligned {hits['aligned']:.0%}, shifted {hits['shifted']:.0%}"
        return best, clear, detail

    def _check_models(self, listed, report: ProbeReport) -> None:
        from gold_pipeline.text.tokenizers import tokenizer_fingerprint

        entries = (listed or {}).get("data") or [] if isinstance(listed, dict) else []
        served = [str(e.get("id")) for e in entries if isinstance(e, dict)]
        if self.model is None:
            if len(served) != 1:
                raise GoldInputError(f"The teacher server at {self.base_url} serves {served or 'no listed models'}: "
                                     "set teacher_server_model to the teacher's name.")
            self.model = served[0]
        elif served and self.model not in served:
            raise GoldInputError(f"The teacher server at {self.base_url} does not serve {self.model!r} "
                                 f"(it serves {served}): fix teacher_server_model.")
        entry = next((e for e in entries if isinstance(e, dict) and str(e.get("id")) == self.model), {})
        declared = entry.get("tokenizer_fingerprint")
        if declared:
            local = tokenizer_fingerprint(self.tokenizer)
            if declared != local:
                raise GoldInputError(
                    f"The teacher server at {self.base_url} declares tokenizer fingerprint {declared[:16]}… for "
                    f"{self.model!r}, the teacher tokenizer's is {local[:16]}…: refused. Point "
                    "teacher_tokenizer_name_or_path at the served model's tokenizer.")
            report.checks.append("declared tokenizer fingerprint matches")

    def _check_tokenizer(self, report: ProbeReport) -> None:
        """Re-tokenization agreement of PROBE_TEXT through the server's tokenize endpoint, when it has one."""
        local = list(self.tokenizer.encode(PROBE_TEXT, add_special_tokens=False))
        for url, body in ((self.root_url + "/tokenize", {"model": self.model, "prompt": PROBE_TEXT,
                                                         "add_special_tokens": False}),
                          (self.root_url + "/extras/tokenize", {"model": self.model, "input": PROBE_TEXT})):
            answer = self._post_json(url, body)
            if not isinstance(answer, dict) or not isinstance(answer.get("tokens"), list):
                continue
            served = [int(t) for t in answer["tokens"]]
            if len(served) == len(local) + 1 and (served[1:] == local or served[0] == self.tokenizer.bos_token_id
                                                  or served[0] not in local):
                served = served[1:]            # a BOS the endpoint adds (llama.cpp tokenizes with add_bos)
            if served != local:
                i = next((p for p, (a, b) in enumerate(zip(served, local)) if a != b), min(len(served), len(local)))
                theirs = served[i] if i < len(served) else None
                ours = local[i] if i < len(local) else None
                raise GoldInputError(
                    f"The teacher server at {self.base_url} tokenizes the probe text {PROBE_TEXT!r} differently from "
                    f"the teacher tokenizer: {len(served)} vs {len(local)} tokens, first difference at token {i} "
                    f"(server id {theirs}, teacher id {ours} = {self.table.pieces[ours] if ours is not None else ''!r})"
                    ": refused. Point teacher_tokenizer_name_or_path at the served model's tokenizer.")
            report.checks.append(f"{url} re-tokenizes the probe text like the teacher tokenizer")
            return
        report.checks.append("no tokenize endpoint: checked by the echoed probe tokens only")


def _describe(error: Exception, timeout_s: float) -> str:
    """A short reason for a failed connection (requests' own messages run to several hundred characters)."""
    import requests

    if isinstance(error, requests.ConnectTimeout):
        return f"no connection within {min(10.0, timeout_s):g} s"
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout_s:g} s"
    reason = str(error)
    for hint in ("Connection refused", "Name or service not known", "No route to host", "Connection reset"):
        if hint in reason:
            return hint.lower()
    return f"{type(error).__name__}: {reason[:160]}"


# ----------------------------------------------------------------------------------------------------------
# The trainer's side
# ----------------------------------------------------------------------------------------------------------


def start_teacher_service(args, tokenizer, *, reference=None, reference_name: str | None = None,
                          load=None) -> TeacherService:
    """The probed service of a GOLDConfig (teacher_server_*). reference: a local teacher (model, name or None);
    with teacher_server_probe="auto" it is loaded (`load(name)`) when only named, compared on the probe, and then
    dropped by the caller: the served teacher scores every completion."""
    service = TeacherService.from_config(args, tokenizer)
    model = None
    if args.teacher_server_probe == "auto":
        model = reference
        if isinstance(model, str) or (model is None and reference_name):
            model = load(model if isinstance(model, str) else reference_name)
    service.probe(model, mode=args.teacher_server_probe)
    return service


def score_batch(service: TeacherService, batch: dict) -> tuple[dict, int]:
    """The served teacher's scores of a collated micro-batch (training/collate.py), laid out like cached top-K:
    {"topk_ids": (Nt, K), "topk_logprobs": (Nt, K), "token_logprobs": (Nt,)} on the batch's device, plus the
    number of actual-token log-probs that are upper bounds."""
    import torch

    input_ids = batch["teacher_input_ids"].cpu()                 # (B, Tt) = left-padded prompt | completion
    attention = batch["teacher_attention_mask"].cpu().bool()
    completion_mask = batch["teacher_completion_mask"].cpu()     # (B, Lt)
    width = input_ids.shape[1] - completion_mask.shape[1]        # P: every completion starts here
    prompts = [input_ids[b, :width][attention[b, :width]].tolist() for b in range(input_ids.shape[0])]
    completions = [input_ids[b, width:][completion_mask[b]].tolist() for b in range(input_ids.shape[0])]
    texts = batch.get("completion_texts") or [""] * len(prompts)
    names = [f"micro-batch row {b} (completion {str(t)[:40]!r})" for b, t in enumerate(texts)]
    scores = service.score_many(prompts, completions, names)
    device = batch["teacher_token_ids"].device
    outputs = {
        "topk_ids": torch.from_numpy(np.concatenate([s.topk_ids for s in scores])).to(device),           # (Nt, K)
        "topk_logprobs": torch.from_numpy(np.concatenate([s.topk_logprobs for s in scores])).to(device),  # (Nt, K)
        "token_logprobs": torch.from_numpy(np.concatenate([s.token_logprobs for s in scores])).to(device),  # (Nt,)
    }
    if outputs["token_logprobs"].shape[0] != batch["teacher_token_ids"].shape[0]:
        raise RuntimeError("served teacher scores do not cover the batch's teacher completion tokens")
    return outputs, sum(s.num_bounded for s in scores)


# ----------------------------------------------------------------------------------------------------------
# References
# ----------------------------------------------------------------------------------------------------------


def reference_logprobs(model, prompt_ids: list[int], completion_ids: list[int]):
    """(m, V) log-probs of a local causal LM at the completion positions (the distribution of each token)."""
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([list(prompt_ids) + list(completion_ids)], device=device)).logits[0].float()
    p = len(prompt_ids)
    return torch.log_softmax(logits[p - 1: p - 1 + len(completion_ids)], dim=-1).cpu()   # (m, V)


def mean_abs_error(scores: ServedScores, reference, completion_ids: list[int]) -> float:
    """Mean |served - reference| (nats) over the named top-K entries and the reported actual-token log-probs."""
    import torch

    ids = torch.from_numpy(scores.topk_ids)
    named = (ids >= 0) & (ids < reference.shape[1])
    ref_k = reference.gather(1, ids.clamp(0, reference.shape[1] - 1)).numpy()
    errors = [np.abs(scores.topk_logprobs - ref_k)[named.numpy()]]
    ref_token = reference.gather(1, torch.tensor(completion_ids)[:, None])[:, 0].numpy()
    reported = ~scores.bounded if scores.bounded is not None else np.ones(len(completion_ids), dtype=bool)
    errors.append(np.abs(scores.token_logprobs - ref_token)[reported])
    values = np.concatenate(errors)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("inf")
