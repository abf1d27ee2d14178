"""``dk serve-teacher MODEL_DIR``: a local transformers causal LM behind an
OpenAI-compatible API (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``).

Sampling: ``n``, ``temperature`` (0 = greedy), ``top_p``, ``max_tokens``, ``seed``,
``stop``. Log-probabilities (``logprobs``/``top_logprobs``) are the model's own
(temperature 1, before top-p), capped at ``max_top_logprobs`` like hosted APIs (a request
above the cap gets a 400). Requests are served one at a time (the model is not
thread-safe); the ``n`` samples of one request are generated as one batch.
"""

import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import DKError


def _require_service():
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise DKError(
            "dk serve-teacher needs FastAPI and uvicorn: pip install 'darkknowledge[service]'"
        ) from None


class Generator:
    """Sampling and log-probs for one causal LM + tokenizer."""

    def __init__(self, model, tokenizer, max_batch: int = 64):
        import torch

        self.torch = torch
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch = max_batch
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        cfg = model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(
            cfg, "n_positions", 2048
        )
        self.lock = threading.Lock()

    def chat_prompt(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        # no template (e.g. a model this tool trained on plain text): the contents in order
        return "\n".join(m.get("content") or "" for m in messages)

    def generate(
        self,
        prompt: str,
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_tokens: int = 16,
        seed: int | None = None,
        stop: list[str] | None = None,
        top_logprobs: int | None = None,
    ) -> tuple[list[dict], int]:
        """``n`` samples → ([{text, finish_reason, tokens: [(str, logprob, {str: lp})]}],
        prompt token count). ``top_logprobs=None``: no log-probs."""
        torch = self.torch
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"] or [self.eos]
        if len(ids) >= self.context:
            raise ValueError(
                f"the prompt is {len(ids)} tokens; the model's context is {self.context}"
            )
        max_new = max(1, min(max_tokens, self.context - len(ids)))
        out: list[dict] = []
        with self.lock, torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            done = 0
            while done < n:
                k = min(self.max_batch, n - done)
                x = torch.tensor([ids] * k)  # (k, T)
                kw: dict[str, Any] = dict(
                    max_new_tokens=max_new,
                    pad_token_id=self.pad,
                    eos_token_id=self.eos,
                    return_dict_in_generate=True,
                    output_logits=top_logprobs is not None,
                )
                if temperature > 0:
                    kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
                else:
                    kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                g = self.model.generate(x, attention_mask=torch.ones_like(x), **kw)
                new = g.sequences[:, len(ids) :]  # (k, S)
                lps = None
                if top_logprobs is not None:
                    lps = torch.log_softmax(torch.stack(g.logits, 1).float(), -1)  # (k, S, V)
                for j in range(k):
                    out.append(
                        self._one(new[j], None if lps is None else lps[j], top_logprobs, stop)
                    )
                done += k
        return out, len(ids)

    def _one(self, new, lp, top: int | None, stop: list[str] | None) -> dict:
        toks = new.tolist()
        finish = "length"
        if self.eos in toks:
            toks = toks[: toks.index(self.eos)]
            finish = "stop"
        pieces = [self.tok.decode([t]) for t in toks]
        text = self.tok.decode(toks)
        if stop:
            cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
                # keep the tokens that start before the cut
                keep, pos = 0, 0
                for p in pieces:
                    if pos >= cut:
                        break
                    pos += len(p)
                    keep += 1
                toks, pieces = toks[:keep], pieces[:keep]
        tokens = []
        if lp is not None:
            for i, (t, p) in enumerate(zip(toks, pieces, strict=True)):
                row = lp[i]  # (V,)
                alts = {}
                if top:
                    v, ix = row.topk(top)
                    for vv, ii in zip(v.tolist(), ix.tolist(), strict=True):
                        alts.setdefault(self.tok.decode([ii]), vv)
                tokens.append((p, float(row[t]), alts, t))
        return {"text": text, "finish_reason": finish, "tokens": tokens, "n_tokens": len(toks)}


def create_app(gen: Generator, model_name: str, max_top_logprobs: int = 20):
    _require_service()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field

    class _Req(BaseModel):
        model_config = ConfigDict(extra="allow")
        model: str | None = None
        n: int = Field(1, ge=1, le=256)
        temperature: float = Field(1.0, ge=0.0, le=2.0)
        top_p: float = Field(1.0, gt=0.0, le=1.0)
        seed: int | None = None
        stop: str | list[str] | None = None

    class ChatReq(_Req):
        messages: list[dict]
        max_tokens: int | None = Field(None, ge=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: bool = False
        top_logprobs: int | None = Field(None, ge=0)

    class CompletionReq(_Req):
        prompt: str
        max_tokens: int = Field(16, ge=1)
        logprobs: int | None = Field(None, ge=0)

    app = FastAPI(title="darkknowledge teacher", version="1")

    def err(code: int, msg: str, typ: str = "invalid_request_error"):
        return JSONResponse({"error": {"message": msg, "type": typ}}, status_code=code)

    @app.exception_handler(RequestValidationError)
    async def _bad(_req: Request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        return err(400, f"{where}: {first.get('msg')}")

    def check(req) -> list[str] | None:
        if req.model not in (None, model_name):
            raise LookupError(f"model {req.model!r} is not served here (this is {model_name!r})")
        return [req.stop] if isinstance(req.stop, str) else req.stop

    def top_cap(k: int | None) -> None:
        if k is not None and k > max_top_logprobs:
            raise ValueError(f"top_logprobs={k} is above this server's cap of {max_top_logprobs}")

    def envelope(kind: str, choices: list, n_prompt: int, outs: list[dict]) -> dict:
        return {
            "id": f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:16]}",
            "object": kind,
            "created": int(time.time()),
            "model": model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": n_prompt,
                "completion_tokens": sum(o["n_tokens"] for o in outs),
                "total_tokens": n_prompt + sum(o["n_tokens"] for o in outs),
            },
        }

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "local"}],
        }

    class Refused(Exception):
        """A request the server answers with an OpenAI-style error body."""

        def __init__(self, code: int, msg: str, typ: str = "invalid_request_error"):
            super().__init__(msg)
            self.code, self.typ = code, typ

    @app.exception_handler(Refused)
    async def _refused(_req: Request, e: Refused):
        return err(e.code, str(e), e.typ)

    def run(req, prompt_of, max_tokens: int, top: int | None) -> tuple[list[dict], int]:
        """Check the request and generate: (outs, prompt tokens); Refused otherwise."""
        try:
            stop = check(req)
            top_cap(top)
            return gen.generate(
                prompt_of(),
                n=req.n,
                temperature=req.temperature,
                top_p=req.top_p,
                max_tokens=max_tokens,
                seed=req.seed,
                stop=stop,
                top_logprobs=top,
            )
        except LookupError as e:
            raise Refused(404, str(e), "model_not_found") from None
        except ValueError as e:
            raise Refused(400, str(e)) from None

    @app.post("/v1/chat/completions")
    def chat(req: ChatReq):
        top = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens or req.max_tokens or 256
        outs, n_prompt = run(req, lambda: gen.chat_prompt(req.messages), max_tokens, top)
        choices = []
        for i, o in enumerate(outs):
            c = {
                "index": i,
                "message": {"role": "assistant", "content": o["text"]},
                "finish_reason": o["finish_reason"],
                "logprobs": None,
            }
            if top is not None:
                c["logprobs"] = {
                    "content": [
                        {
                            "token": p,
                            "logprob": lp,
                            "bytes": list(p.encode()),
                            "top_logprobs": [
                                {"token": a, "logprob": v, "bytes": list(a.encode())}
                                for a, v in alts.items()
                            ],
                        }
                        for p, lp, alts, _ in o["tokens"]
                    ]
                }
            choices.append(c)
        return envelope("chat.completion", choices, n_prompt, outs)

    @app.post("/v1/completions")
    def completions(req: CompletionReq):
        outs, n_prompt = run(req, lambda: req.prompt, req.max_tokens, req.logprobs)
        choices = []
        for i, o in enumerate(outs):
            c = {
                "index": i,
                "text": o["text"],
                "finish_reason": o["finish_reason"],
                "logprobs": None,
            }
            if req.logprobs is not None:
                offs, pos = [], len(req.prompt)
                for p, *_ in o["tokens"]:
                    offs.append(pos)
                    pos += len(p)
                c["logprobs"] = {
                    "tokens": [p for p, *_ in o["tokens"]],
                    "token_logprobs": [lp for _, lp, *_ in o["tokens"]],
                    "top_logprobs": [alts for _, _, alts, _ in o["tokens"]],
                    "text_offset": offs,
                }
            choices.append(c)
        return envelope("text_completion", choices, n_prompt, outs)

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
