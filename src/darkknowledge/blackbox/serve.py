"""``dk serve-teacher MODEL_DIR``: a local transformers causal LM behind an
OpenAI-compatible API, for the official ``openai`` client and anything that speaks it.

Routes: ``GET /v1/models``, ``GET /v1/models/{id}``, ``POST /v1/completions``,
``POST /v1/chat/completions``.

- Sampling: ``n``, ``temperature`` (0 = greedy), ``top_p``, ``max_tokens`` (chat: also
  ``max_completion_tokens``; default 256, completions 16; both clamped to the context),
  ``seed``, ``stop``. ``best_of`` only as 1 or ``n`` (every sample drawn is returned).
- ``stream: true``: server-sent events (``data: {chunk}``, then ``data: [DONE]``), with
  log-probs in the chunks and ``stream_options.include_usage`` (a last chunk with the
  usage). The text (and log-probs) assembled from the chunks are those of the same request
  unstreamed.
- Log-probabilities are the model's own (temperature 1, before top-p): chat
  ``logprobs``/``top_logprobs``, completions ``logprobs`` (the legacy shape), capped at
  ``max_top_logprobs`` like hosted APIs (a request above the cap gets a 400).
- Completions ``echo`` (as vLLM offers it): the prompt comes back before the completion,
  and with ``logprobs`` its tokens are scored too (the first token's log-prob is null);
  ``max_tokens: 0`` scores a given text without generating. ``prompt`` may be a text,
  a list of texts, token ids, or lists of token ids (choice ``i*n + j`` is sample ``j`` of
  prompt ``i``).
- ``return_tokens_as_token_ids: true`` (completions, as vLLM offers it): the log-prob
  tokens and alternatives as ``token_id:N``, so that tokens which decode alike (byte
  pieces of one character, ``▁the`` and ``the``) stay apart.
- Chat ``content`` is a string or a list of ``text`` parts (joined by newlines).
- Errors are OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for
  a malformed body and for each field the server would otherwise have to ignore
  (``logit_bias``, penalties, tools, ``response_format`` other than text, unknown fields:
  see :mod:`.openai_api`), 404 for an unknown model.

Requests are served one at a time (the model is not thread-safe); the ``n`` samples of one
prompt are generated as one batch (see :mod:`.sampler`).
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

from ..errors import DKError
from .openai_api import (
    ApiError,
    chat_messages,
    error_body,
    loc_name,
    refuse_fields,
    request_models,
)
from .sampler import Generator, Piece, Token, collect

__all__ = ["Generator", "create_app", "load_generator", "serve_teacher", "start_server"]

CHAT_MAX_TOKENS = 256  # chat's default max_tokens
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for completions


def _require_service():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DKError(
            "dk serve-teacher needs FastAPI and uvicorn: pip install 'darkknowledge[service]'"
        ) from None


def _chat_lp(t: Token) -> dict:
    return {
        "token": t.text,
        "logprob": t.logprob,
        "bytes": list(t.text.encode()),
        "top_logprobs": [
            {"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in t.top or []
        ],
    }


def _top_dict(top: list[tuple[str, float]] | None) -> dict | None:
    if top is None:
        return None
    d: dict[str, float] = {}
    for a, v in top:  # two ids that decode alike: the more probable one
        d.setdefault(a, v)
    return d


def _legacy_lp(tokens: list[Token], as_ids: bool = False) -> dict:
    """Completions ``logprobs``; ``as_ids``: each token as ``token_id:N`` (vLLM's
    ``return_tokens_as_token_ids``), so two tokens that decode alike are told apart."""
    if as_ids:
        tops = [
            None if t.top is None
            else {f"token_id:{i}": v for i, (_, v) in zip(t.top_ids, t.top, strict=True)}
            for t in tokens
        ]  # fmt: skip
    else:
        tops = [_top_dict(t.top) for t in tokens]
    return {
        "tokens": [f"token_id:{t.id}" if as_ids else t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": tops,
        "text_offset": [t.offset for t in tokens],
    }


def _usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out,
            "total_tokens": n_prompt + n_out}  # fmt: skip


def _sse(chunks):
    """A streamed answer: each chunk (from a sync iterator, advanced in a worker thread)
    as ``data: {json}``, then ``data: [DONE]``; an error midway ends the stream with an
    ``{"error": ...}`` event (the openai client raises it). If the client goes away,
    the iterator is closed, which stops the generation and frees the model."""
    import anyio
    from fastapi.responses import StreamingResponse

    end = object()

    async def body():
        try:
            while True:
                item = await anyio.to_thread.run_sync(next, chunks, end)
                if item is end:
                    break
                yield f"data: {json.dumps(item)}\n\n"
        except Exception as e:  # the status line is sent: report in the stream
            yield f"data: {json.dumps(error_body(f'{type(e).__name__}: {e}', 'server_error'))}\n\n"
            return
        finally:
            chunks.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def create_app(gen: Generator, model_name: str, max_top_logprobs: int = 20):
    _require_service()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    created = int(time.time())
    ChatRequest, CompletionRequest = request_models(gen.vocab, max_top_logprobs)
    app = FastAPI(title="darkknowledge teacher", version="1")

    @app.exception_handler(ApiError)
    async def _api_error(_req: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _bad(_req: Request, e: RequestValidationError):
        msgs, param = [], None
        seen = set()
        for er in e.errors():
            loc = tuple(er.get("loc", ()))
            name = loc_name(loc[1:] if loc[:1] == ("body",) else loc) or "body"
            if name in seen:  # another branch of a union: the first says enough
                continue
            seen.add(name)
            if er.get("type") == "json_invalid":
                name = "body"
                msg = f"not valid JSON ({(er.get('ctx') or {}).get('error', er.get('msg'))})"
            else:
                msg = er.get("msg", "invalid")
                param = param or (name if name != "body" else None)
            msgs.append(f"{name}: {msg}")
        more = f" (and {len(msgs) - 3} more)" if len(msgs) > 3 else ""
        return JSONResponse(error_body("; ".join(msgs[:3]) + more, param=param), 400)

    @app.exception_handler(HTTPException)
    async def _http(_req: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail)), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def _crash(_req: Request, e: Exception):
        return JSONResponse(error_body(f"{type(e).__name__}: {e}", "server_error"), 500)

    card = {"id": model_name, "object": "model", "created": created, "owned_by": "darkknowledge"}

    def check_model(name: str | None) -> None:
        if name not in (None, model_name):
            raise ApiError(
                404,
                f"The model {name!r} does not exist (this server serves {model_name!r})",
                "model",
                "model_not_found",
            )

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    def model(model_id: str):
        check_model(model_id)
        return card

    def check_common(req, top: int | None, top_field: str) -> None:
        refuse_fields(req.model_extra or {})
        check_model(req.model)
        if req.stream_options is not None and not req.stream:
            raise ApiError(400, "stream_options is only allowed with stream: true",
                           "stream_options")  # fmt: skip
        if top is not None and top > max_top_logprobs:
            raise ApiError(
                400,
                f"{top_field}={top} is above this server's cap of {max_top_logprobs}",
                top_field,
                "invalid_value",
            )

    def prompt_ids(ids: list[int], field: str) -> list[int]:
        try:
            return gen.check_prompt(ids)
        except ValueError as e:
            code = "context_length_exceeded" if "context" in str(e) else "invalid_value"
            raise ApiError(400, f"{field}: {e}", field, code) from None

    def sampling(req, n: int, max_tokens: int, top: int | None) -> dict:
        return dict(
            n=n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            max_tokens=max_tokens,
            seed=req.seed,
            stop=req.stops(),
            top_logprobs=top,
        )

    def head(kind: str) -> dict:
        prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "object": kind,
                "created": int(time.time()), "model": model_name}  # fmt: skip

    @app.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        check_common(req, top, "top_logprobs")
        msgs = chat_messages(req.messages)
        try:
            text = gen.chat_prompt(msgs)
        except Exception as e:  # the template's own checks (role order, ...)
            raise ApiError(400, f"messages: the chat template refused them: {e}",
                           "messages") from None  # fmt: skip
        ids = prompt_ids(gen.encode(text), "messages")
        n = req.n or 1
        max_tokens = req.max_completion_tokens or req.max_tokens or CHAT_MAX_TOKENS
        kw = sampling(req, n, max_tokens, top)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(chat_chunks(head("chat.completion.chunk"), ids, kw, usage))
        samples = collect(gen.pieces(ids, **kw), n)
        choices = []
        for i, s in enumerate(samples):
            lp = None
            if top is not None:
                lp = {"content": [_chat_lp(t) for t in s.tokens], "refusal": None}
            choices.append({
                "index": i,
                "message": {"role": "assistant", "content": s.text, "refusal": None},
                "logprobs": lp,
                "finish_reason": s.finish,
            })  # fmt: skip
        n_out = sum(s.n_tokens for s in samples)
        return head("chat.completion") | {"choices": choices, "usage": _usage(len(ids), n_out)}

    def chat_chunks(h: dict, ids: list[int], kw: dict, usage: bool):
        extra = {"usage": None} if usage else {}
        n_out = 0

        def chunk(i, delta, lp=None, finish=None):
            return h | {"choices": [{"index": i, "delta": delta, "logprobs": lp,
                                     "finish_reason": finish}]} | extra  # fmt: skip

        for i in range(kw["n"]):
            yield chunk(i, {"role": "assistant", "content": ""})
        with closing(gen.pieces(ids, **kw)) as pieces:
            for p in pieces:
                if p.text or p.tokens:
                    lp = None
                    if kw["top_logprobs"] is not None and p.tokens:
                        lp = {"content": [_chat_lp(t) for t in p.tokens], "refusal": None}
                    yield chunk(p.index, {"content": p.text}, lp)
                if p.finish:
                    n_out += p.n_tokens
                    yield chunk(p.index, {}, finish=p.finish)
        if usage:
            yield h | {"choices": [], "usage": _usage(len(ids), n_out)}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest):
        n = req.n or 1
        top = req.logprobs
        check_common(req, top, "logprobs")
        if req.best_of not in (None, 1, n):
            raise ApiError(
                400,
                f"best_of={req.best_of} with n={n} is not supported: this server returns "
                "every sample it draws (best_of must be 1 or n)",
                "best_of",
                "unsupported_value",
            )
        p = req.prompt
        if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)):
            p = [p]
        prompts = []  # (text, ids fed to the model, echo the prompt's tokens?)
        for x in p:
            ids = gen.encode(x) if isinstance(x, str) else list(x)
            feed = prompt_ids(ids, "prompt")  # checked before token ids are decoded
            prompts.append((x if isinstance(x, str) else gen.decode(ids), feed, bool(ids)))
        max_tokens = COMPLETION_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        kw = sampling(req, n, max_tokens, top)
        echo = bool(req.echo)
        as_ids = bool(req.return_tokens_as_token_ids)
        n_prompt = sum(len(ids) for _, ids, _ in prompts)
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(completion_chunks(head("text_completion"), prompts, kw, echo, usage,
                                          n_prompt, as_ids))  # fmt: skip
        with closing(completion_pieces(prompts, kw, echo)) as pieces:
            samples = collect(pieces, n * len(prompts))
        choices = [
            {
                "index": i,
                "text": s.text,
                "logprobs": None if top is None else _legacy_lp(s.tokens, as_ids),
                "finish_reason": s.finish,
            }
            for i, s in enumerate(samples)
        ]
        n_out = sum(s.n_tokens for s in samples)
        return head("text_completion") | {"choices": choices, "usage": _usage(n_prompt, n_out)}

    def completion_pieces(prompts, kw: dict, echo: bool):
        """The pieces of every choice: prompt ``i``'s samples are choices ``i*n ..``;
        with ``echo`` each starts with the prompt (and its scored tokens)."""
        n, top = kw["n"], kw["top_logprobs"]
        for i, (text, ids, real) in enumerate(prompts):
            if echo:
                scored = gen.score_prompt(ids, top) if top is not None and real else []
                for j in range(n):
                    yield Piece(i * n + j, text, scored)
            with closing(gen.pieces(ids, **kw)) as pieces:
                for piece in pieces:
                    piece.index += i * n
                    for t in piece.tokens:  # text_offset counts from the prompt's start
                        t.offset += len(text)
                    yield piece

    def completion_chunks(
        h: dict, prompts, kw: dict, echo: bool, usage: bool, n_prompt: int, as_ids: bool
    ):
        extra = {"usage": None} if usage else {}
        n_out = 0
        with closing(completion_pieces(prompts, kw, echo)) as pieces:
            for p in pieces:
                lp = None
                if kw["top_logprobs"] is not None and p.tokens:
                    lp = _legacy_lp(p.tokens, as_ids)
                n_out += p.n_tokens
                yield h | {"choices": [{"index": p.index, "text": p.text, "logprobs": lp,
                                        "finish_reason": p.finish}]} | extra  # fmt: skip
        if usage:
            yield h | {"choices": [], "usage": _usage(n_prompt, n_out)}

    return app


def load_generator(model_dir: str | Path, max_batch: int = 64) -> Generator:
    from ..hf.io import load_model, load_tokenizer

    p = Path(model_dir)
    if not p.is_dir():
        raise DKError(f"{p}: no such model folder (expected config.json + weights + tokenizer)")
    model = load_model(p, "AutoModelForCausalLM")
    tok = load_tokenizer(p)
    if tok.eos_token_id is None:
        raise DKError(f"{p}: the tokenizer has no end-of-sequence token; set eos_token")
    return Generator(model, tok, max_batch=max_batch)


def serve_teacher(
    model_dir,
    host: str = "127.0.0.1",
    port: int = 8001,
    model_name: str | None = None,
    max_top_logprobs: int = 20,
    max_batch: int = 64,
) -> int:
    _require_service()
    import uvicorn

    gen = load_generator(model_dir, max_batch)
    name = model_name or Path(model_dir).resolve().name
    app = create_app(gen, name, max_top_logprobs)
    print(f"serving {name!r} at http://{host}:{port}/v1 (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
    return 0


def start_server(
    model_dir: str | Path,
    log: str | Path,
    *,
    name: str,
    port: int | None = None,
    env: dict | None = None,
    wait_s: float = 120.0,
) -> tuple[subprocess.Popen, str]:
    """``dk serve-teacher MODEL_DIR`` in its own process, its output appended to ``log``,
    on ``port`` of the loopback (a free one when None); returns once it answers
    ``GET /models``: (the process, its base URL). The caller stops the process. One line
    (the process killed) when the port is taken, or the server exits or stays silent."""
    import httpx

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port or 0))
        except OSError:
            raise DKError(f"port {port} is taken by another process") from None
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "darkknowledge.cli", "serve-teacher", str(model_dir),
           "--port", str(port), "--model-name", name]  # fmt: skip
    with open(log, "a") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or os.environ)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DKError(f"dk serve-teacher exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/models", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    raise DKError(f"dk serve-teacher did not answer within {wait_s:g} s; see {log}")
