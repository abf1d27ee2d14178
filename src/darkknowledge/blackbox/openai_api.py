"""The OpenAI API as ``dk serve-teacher`` speaks it: request bodies (pydantic, so that
``/openapi.json`` describes them), the fields it refuses, and the error shape.

A field the server would have to ignore is refused with a 400 naming it, never ignored:
a client that asks for ``logit_bias`` or a penalty must not get an answer made without
it. Fields that do not change what is generated (``user``, ``metadata``, cache keys,
``service_tier``, ...) are accepted; so are the neutral values of unsupported ones
(``presence_penalty: 0``, ``logit_bias: {}``, ``response_format: {"type": "text"}``,
``tool_choice: "none"``, ...), which clients often send by default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

TokenId = Annotated[int, Field(ge=0)]
SEED = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes


class ApiError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        typ: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.typ = (
            status,
            message,
            param,
            code,
            typ,
        )

    def body(self) -> dict:
        return error_body(self.message, self.typ, self.param, self.code)


def error_body(message: str, typ: str = "invalid_request_error", param=None, code=None) -> dict:
    return {"error": {"message": message, "type": typ, "param": param, "code": code}}


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def loc_name(loc) -> str:
    """``("body", "messages", 0, "content")`` → ``messages[0].content``."""
    out = ""
    for x in loc:
        if isinstance(x, str) and (x in _TYPE_TAGS or not x.isidentifier() or x[0].isupper()):
            continue  # which branch of a union pydantic tried (str, list[int], Message, ...)
        if isinstance(x, int):
            out += f"[{x}]"
        else:
            out += ("." if out else "") + str(x)
    return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool | None = None
    # OpenAI pads streamed chunks against side channels; there is nothing to pad here
    include_obfuscation: bool | None = None


# The bodies keep undeclared fields (so that refuse_fields can name them), while the
# published schema says what a request may hold: a client that follows it is never refused
# for a field.
_CLOSED = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False})


class _Req(BaseModel):
    model_config = _CLOSED
    model: str | None = None
    n: int | None = Field(None, ge=1, le=256)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = SEED
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # accepted, and change nothing generated
    user: str | None = None
    metadata: dict[str, str] | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ContentPart(BaseModel):
    # any type parses, so that a non-text part gets a 400 that names it (chat_messages);
    # the schema says what is served
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "additionalProperties": False,
            "required": ["type", "text"],
            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
        },
    )
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = _CLOSED
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None


class ChatRequest(_Req):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)


class CompletionRequest(_Req):
    # a text, texts, token ids, or lists of token ids (one choice group per prompt)
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[list[TokenId]], Field(min_length=1)]
    )
    max_tokens: int | None = Field(None, ge=0)
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1)
    # vLLM's: log-prob tokens as ``token_id:N`` (tokens that decode alike stay apart)
    return_tokens_as_token_ids: bool | None = False


def request_models(vocab: int, max_top: int) -> tuple[type, type]:
    """The request bodies of one server, whose schema also states its model's limits:
    token ids below ``vocab``, at most ``max_top`` log-probs per token. They are checked
    after parsing (a 400 that says which limit), not by the parser."""

    def upto(hi: int):
        return Annotated[int, Field(ge=0),
                         WithJsonSchema({"type": "integer", "minimum": 0, "maximum": hi})]  # fmt: skip

    tok = upto(vocab - 1)

    class Chat(ChatRequest):
        top_logprobs: upto(max_top) | None = None  # type: ignore[valid-type]

    class Completion(CompletionRequest):
        prompt: (  # type: ignore[valid-type]
            str
            | Annotated[list[str], Field(min_length=1)]
            | Annotated[list[tok], Field(min_length=1)]
            | Annotated[list[list[tok]], Field(min_length=1)]
        )
        logprobs: upto(max_top) | None = None  # type: ignore[valid-type]

    Chat.__name__ = Chat.__qualname__ = "ChatRequest"
    Completion.__name__ = Completion.__qualname__ = "CompletionRequest"
    return Chat, Completion


def _none(v) -> bool:
    return v is None


def _zero(v) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _empty(v) -> bool:
    return v is None or (isinstance(v, list | dict | str) and not v)


# accepted because they do not change what is generated
HINTS = {  # (user and metadata are declared)
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "service_tier",
    "parallel_tool_calls",  # without tools, nothing to parallelize
}

# field → (is its value one the server honours?, why not otherwise)
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "logit_bias": (_empty, "logit_bias is not applied"),
    "presence_penalty": (_zero, "penalties are not applied (only 0)"),
    "frequency_penalty": (_zero, "penalties are not applied (only 0)"),
    "tools": (_empty, "no tool calling"),
    "functions": (_empty, "no function calling"),
    "tool_choice": (lambda v: v in (None, "none", "auto"), "no tool calling"),
    "function_call": (lambda v: v in (None, "none", "auto"), "no function calling"),
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        "only plain text output (response_format type 'text')",
    ),
    "modalities": (lambda v: v is None or v == ["text"], "text output only"),
    "store": (lambda v: v is None or v is False, "completions are not stored"),
    "suffix": (_empty, "no insertion (suffix)"),
    "reasoning_effort": (_none, "not a reasoning model"),
    "verbosity": (_none, "no verbosity control"),
    "audio": (_none, "no audio output"),
    "prediction": (_none, "no predicted outputs"),
    "web_search_options": (_none, "no web search"),
    "moderation": (_none, "no moderation"),
    "prompt_cache_options": (_none, "no prompt cache"),
}

MESSAGE_FIELDS: dict[str, Any] = {  # in chat messages (e.g. an echoed assistant message)
    "refusal": _none,
    "tool_calls": _empty,
    "function_call": _none,
    "audio": _none,
    "annotations": _empty,
}


def refuse_fields(extra: dict, where: str = "") -> None:
    """A 400 naming each field in ``extra`` (the body's undeclared fields) that the
    server does not support, or does not know."""
    bad = []
    for k, v in extra.items():
        if k in HINTS:
            continue
        if k in UNSUPPORTED:
            ok, why = UNSUPPORTED[k]
            if not ok(v):
                bad.append((where + k, f"{where + k}={_short(v)} ({why})"))
        else:
            bad.append((where + k, f"{where + k} (unknown field)"))
    if bad:
        code = "unsupported_parameter"
        if all(m.endswith("(unknown field)") for _, m in bad):
            code = "unknown_parameter"
        raise ApiError(
            400,
            "not supported by this server: " + "; ".join(m for _, m in bad),
            bad[0][0],
            code,
        )


def _short(v) -> str:
    import json

    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def chat_messages(messages: list[Message]) -> list[dict]:
    """Messages for a chat template: string contents (text parts joined by newlines,
    as vLLM does), ``developer`` as ``system``; a 400 naming anything else."""
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        bad = [f"{at}.{k}" for k, v in (m.model_extra or {}).items()
               if not MESSAGE_FIELDS.get(k, lambda _v: False)(v)]  # fmt: skip
        if bad:
            raise ApiError(400, f"not supported by this server: {', '.join(bad)}", bad[0],
                           "unsupported_parameter")  # fmt: skip
        if isinstance(m.content, str):
            text = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                pat = f"{at}.content[{j}]"
                if part.type != "text":
                    raise ApiError(
                        400,
                        f"{pat}: content parts of type {part.type!r} are not supported "
                        "(this server reads 'text' parts only)",
                        f"{pat}.type",
                        "unsupported_value",
                    )
                if part.text is None:
                    raise ApiError(400, f"{pat}.text: a text part needs text", f"{pat}.text")
                extra = [k for k, v in (part.model_extra or {}).items() if v is not None]
                if extra:
                    raise ApiError(400, f"not supported by this server: {pat}.{extra[0]}",
                                   f"{pat}.{extra[0]}", "unsupported_parameter")  # fmt: skip
                texts.append(part.text)
            text = "\n".join(texts)
        msg = {"role": "system" if m.role == "developer" else m.role, "content": text}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def token_id(name) -> int | None:
    """N of a log-prob token named ``token_id:N`` (vLLM's ``return_tokens_as_token_ids``,
    also dk serve-teacher's), else None (a token text)."""
    if isinstance(name, str) and name.startswith("token_id:") and name[9:].isdigit():
        return int(name[9:])
    return None
