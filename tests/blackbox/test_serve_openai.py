"""dk serve-teacher as an OpenAI-compatible server, driven by the official ``openai``
client against a real loopback server (the tiny char-level teacher of conftest.py):
models, completions and chat, log-probs, n, seed, stop, echo scoring, streaming (the
assembled stream is the unstreamed answer), content parts, and a 400 in OpenAI's error
shape for every field the server would otherwise ignore. Last, a schemathesis run over
the server's own OpenAPI schema finds no 5xx."""

from __future__ import annotations

import httpx
import openai
import pytest

from conftest import serving, tiny_teacher

P = "Q: Ann has 3 eggs."
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def client(served):
    """Strict: every answer is validated against the client's own types."""
    return openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def lax(served):
    """For what the client's types do not allow though OpenAI sends it: a streamed
    completion chunk's ``finish_reason: null``, echo's null first log-prob."""
    return openai.OpenAI(base_url=served[0], api_key="unused", max_retries=0, timeout=60)


def _error(exc_info, status: int, param: str | None) -> str:
    e = exc_info.value
    assert e.status_code == status
    body = e.response.json()["error"]
    assert set(body) == ERROR_KEYS and body["type"] == "invalid_request_error"
    assert body["param"] == param
    return body["message"]


def test_models(client, served):
    assert [m.id for m in client.models.list()] == ["tiny"]
    m = client.models.retrieve("tiny")
    assert m.object == "model" and m.created > 1_600_000_000 and m.owned_by
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-unknown")
    assert "gpt-unknown" in _error(e, 404, "model")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="other", prompt="Q", max_tokens=1)
    _error(e, 404, "model")
    # routes and methods the server does not have: the same error shape
    r = httpx.get(served[0] + "/nothing", timeout=60)
    assert r.status_code == 404 and set(r.json()["error"]) == ERROR_KEYS
    r = httpx.delete(served[0] + "/models", timeout=60)
    assert r.status_code == 405 and set(r.json()["error"]) == ERROR_KEYS


def test_completions(client, served):
    gen = served[1]
    kw = dict(model="tiny", prompt=P, max_tokens=8, n=3, seed=7, logprobs=3)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert [c.index for c in a.choices] == [0, 1, 2]
    other = client.completions.create(**kw | {"seed": 8})
    assert [c.text for c in other.choices] != [c.text for c in a.choices]
    assert a.usage.prompt_tokens == len(P)
    assert a.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in a.choices)
    for c in a.choices:
        lp = c.logprobs
        assert "".join(lp.tokens) == c.text and c.finish_reason in ("stop", "length")
        assert lp.text_offset == [
            len(P) + len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))
        ]
        for t, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
            assert t <= 0 and len(top) == 3 and list(top.values()) == sorted(top.values())[::-1]
    # token ids for a prompt: the same as its text
    ids = client.completions.create(**kw | {"prompt": gen.encode(P)})
    assert [c.text for c in ids.choices] == [c.text for c in a.choices]
    # several prompts: choice i*n + j is sample j of prompt i
    two = client.completions.create(**kw | {"prompt": [P, "Q: Ben"], "n": 2})
    alone = client.completions.create(**kw | {"n": 2})
    assert len(two.choices) == 4 and [c.index for c in two.choices] == [0, 1, 2, 3]
    assert [c.text for c in two.choices[:2]] == [c.text for c in alone.choices]
    assert two.usage.prompt_tokens == len(P) + len("Q: Ben")
    # greedy: the chosen token is the most probable one; n copies are the same
    g = client.completions.create(**kw | {"temperature": 0})
    assert len({c.text for c in g.choices}) == 1
    for t, top in zip(g.choices[0].logprobs.token_logprobs, g.choices[0].logprobs.top_logprobs,
                      strict=True):  # fmt: skip
        assert t == pytest.approx(max(top.values()), abs=1e-5)


def test_stop(client):
    kw = dict(model="tiny", prompt="Q:", max_tokens=24, n=4, seed=1, logprobs=1)
    full = client.completions.create(**kw)
    cut = client.completions.create(**kw | {"stop": ["e", "7"]})
    for c, f in zip(cut.choices, full.choices, strict=True):
        assert "e" not in c.text and "7" not in c.text and f.text.startswith(c.text)
        assert "".join(c.logprobs.tokens) == c.text
        if c.text != f.text:
            assert c.finish_reason == "stop" and f.text[len(c.text)] in "e7"
    assert sum(c.text != f.text for c, f in zip(cut.choices, full.choices, strict=True)) >= 1


def test_chat(client, served):
    gen = served[1]
    msgs = [{"role": "user", "content": "Q: Ben"}]
    kw = dict(model="tiny", messages=msgs, max_tokens=6, seed=3, logprobs=True, top_logprobs=2)
    g = client.chat.completions.create(**kw | {"temperature": 0})
    for t in g.choices[0].logprobs.content:
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5)
        assert len(t.top_logprobs) == 2 and bytes(t.bytes).decode() == t.token
    assert "".join(t.token for t in g.choices[0].logprobs.content) == g.choices[0].message.content
    a = client.chat.completions.create(**kw | {"n": 3})
    assert a.object == "chat.completion" and len(a.choices) == 3
    assert all(c.message.role == "assistant" for c in a.choices)
    assert a.usage.prompt_tokens == len(gen.encode(gen.chat_prompt(msgs)))
    assert a.usage.completion_tokens <= 3 * 6
    # content as a list of text parts (joined by newlines), a developer message as system
    parts = [{"type": "text", "text": "Q:"}, {"type": "text", "text": "Ben"}]
    p = client.chat.completions.create(**kw | {"messages": [{"role": "user", "content": parts}]})
    s = client.chat.completions.create(
        **kw | {"messages": [{"role": "user", "content": "Q:\nBen"}]}
    )
    assert p.choices[0].message.content == s.choices[0].message.content
    d = client.chat.completions.create(
        **kw | {"messages": [{"role": "developer", "content": "Be brief."}, *msgs]}
    )
    assert d.usage.prompt_tokens == len(gen.encode(gen.chat_prompt(
        [{"role": "system", "content": "Be brief."}, *msgs])))  # fmt: skip
    # max_completion_tokens (the newer name) bounds each sample
    m = client.chat.completions.create(**kw | {"max_completion_tokens": 2, "n": 2})
    assert all(len(c.logprobs.content) <= 2 for c in m.choices)
    # an image part: a 400 that names it
    bad = [{"type": "text", "text": "Q:"}, {"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": bad}])
    assert "image_url" in _error(e, 400, "messages[0].content[1].type")


def _assemble(chunks, chat: bool) -> tuple[dict, object]:
    """Streamed chunks → ({index: (text, logprob entries, finish_reason)}, usage)."""
    out: dict[int, list] = {}
    usage = None
    assert len({c.id for c in chunks}) == 1
    for c in chunks:
        if not c.choices:
            usage = c.usage
        for ch in c.choices:
            o = out.setdefault(ch.index, ["", [], None])
            o[0] += (ch.delta.content or "") if chat else ch.text
            if ch.logprobs is not None:
                if chat:
                    o[1] += [(t.token, t.logprob, [x.logprob for x in t.top_logprobs])
                             for t in ch.logprobs.content]  # fmt: skip
                else:
                    lp = ch.logprobs
                    o[1] += list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                     lp.text_offset, strict=True))  # fmt: skip
            if ch.finish_reason:
                assert o[2] is None
                o[2] = ch.finish_reason
    return out, usage


@pytest.mark.parametrize("n", [1, 3])
def test_stream_equals_unstreamed(lax, client, n):
    # completions (stop sequences held back while they may be starting)
    kw = dict(model="tiny", prompt=P, max_tokens=24, n=n, seed=5, logprobs=2, stop=["e:", "7"])
    whole = lax.completions.create(**kw)
    chunks = list(lax.completions.create(**kw, stream=True,
                                         stream_options={"include_usage": True}))  # fmt: skip
    got, usage = _assemble(chunks, chat=False)
    assert sorted(got) == list(range(n)) and usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])
    for c in whole.choices:
        lp = c.logprobs
        want = list(zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, lp.text_offset, strict=True))
        assert got[c.index] == [c.text, want, c.finish_reason]
    # chat (the strict client: chunks are validated)
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Q: Ben"}], max_tokens=24,
              n=n, seed=5, logprobs=True, top_logprobs=2)  # fmt: skip
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].delta.role for c in chunks[:n]] == ["assistant"] * n
    got, usage = _assemble(chunks, chat=True)
    assert usage == whole.usage
    for c in whole.choices:
        want = [(t.token, t.logprob, [x.logprob for x in t.top_logprobs])
                for t in c.logprobs.content]  # fmt: skip
        assert got[c.index] == [c.message.content, want, c.finish_reason]
    # no usage chunk unless asked for
    plain = list(client.chat.completions.create(**kw, stream=True))
    assert all(c.choices for c in plain) and _assemble(plain, chat=True)[0] == got


def test_stream_wire_format(served):
    """What goes over the wire: ``data: {json}`` events and ``data: [DONE]``."""
    body = {"prompt": P, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", served[0] + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in events) and events[-1] == "data: [DONE]"
    # a refused streamed request is a plain 400 before any event
    r = httpx.post(served[0] + "/completions", json=body | {"logit_bias": {"3": 1}}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"


def test_a_client_that_leaves_stops_the_generation(served, monkeypatch):
    """Closing a stream midway closes the generation (and frees the model) instead of
    generating the rest for nobody."""
    import time

    url, gen = served
    ends: list[str] = []
    pieces = gen.pieces

    def spy(*a, **k):
        try:
            yield from pieces(*a, **k)
            ends.append("finished")
        except GeneratorExit:
            ends.append("closed")
            raise

    monkeypatch.setattr(gen, "pieces", spy)
    body = {"prompt": P, "max_tokens": 1000, "n": 8, "stream": True, "temperature": 1.0}
    with httpx.stream("POST", url + "/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    t0 = time.time()
    while not ends and time.time() - t0 < 30:
        time.sleep(0.01)
    assert ends == ["closed"] and not gen.lock.locked()
    ok = httpx.post(url + "/completions", json={"prompt": P, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_echo_scores_the_prompt(lax, served):
    """On-policy distillation through a served teacher: score a given text."""
    import torch

    gen = served[1]
    r = lax.completions.create(model="tiny", prompt=P, max_tokens=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == P and c.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(P)
    lp = c.logprobs
    assert "".join(lp.tokens) == P and lp.text_offset == list(range(len(P)))
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ids = gen.encode(P)
    with torch.no_grad():
        want = torch.log_softmax(gen.model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(want[i - 1, ids[i]]), abs=1e-4)
        assert list(lp.top_logprobs[i].values()) == pytest.approx(
            want[i - 1].topk(2).values.tolist(), abs=1e-4)  # fmt: skip
    # token ids score the same
    t = lax.completions.create(model="tiny", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    assert t.choices[0].logprobs.token_logprobs == lp.token_logprobs
    # echo with a completion: the prompt, then what the same request unechoed returns
    kw = dict(model="tiny", prompt=P, max_tokens=6, seed=3, logprobs=2, n=2)
    plain = lax.completions.create(**kw)
    echoed = lax.completions.create(**kw, echo=True)
    for e, p in zip(echoed.choices, plain.choices, strict=True):
        assert e.text == P + p.text
        assert e.logprobs.tokens == lp.tokens + p.logprobs.tokens
        assert e.logprobs.token_logprobs == lp.token_logprobs + p.logprobs.token_logprobs
        assert e.logprobs.text_offset == lp.text_offset + p.logprobs.text_offset
    got, _ = _assemble(list(lax.completions.create(**kw, echo=True, stream=True)), chat=False)
    assert [got[i][0] for i in range(2)] == [e.text for e in echoed.choices]


@pytest.mark.parametrize(
    "api, fields, param",
    [
        ("completions", {"logit_bias": {"5": 10}}, "logit_bias"),
        ("completions", {"presence_penalty": 0.5}, "presence_penalty"),
        ("chat", {"frequency_penalty": -1.0}, "frequency_penalty"),
        ("completions", {"best_of": 3}, "best_of"),
        ("completions", {"suffix": " end"}, "suffix"),
        ("chat", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
        ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("chat", {"top_k": 5}, "top_k"),  # not OpenAI's: unknown
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # without logprobs
        ("chat", {"logprobs": True, "top_logprobs": 6}, "top_logprobs"),  # above the cap
        ("completions", {"stream_options": {"include_usage": True}}, "stream_options"),
        ("completions", {"prompt": [[1, 10**6]]}, "prompt"),  # not a token id
        ("completions", {"prompt": "Q" * 1024}, "prompt"),  # longer than the context
        ("completions", {"n": 0}, "n"),
        ("completions", {"temperature": "hot"}, "temperature"),
        ("chat", {"messages": []}, "messages"),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ],
)
def test_refused_fields(client, api, fields, param):
    """Every field the server cannot honour is a 400 naming it, never silently ignored."""
    with pytest.raises(openai.BadRequestError) as e:
        if api == "chat":
            client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Q"}], max_tokens=2,
                extra_body=fields)  # fmt: skip
        else:
            client.completions.create(model="tiny", prompt="Q", max_tokens=2, extra_body=fields)
    assert param in _error(e, 400, param)


def test_refusals_name_each_field_and_neutral_values_pass(client, served):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="Q", logit_bias={"1": 1},
                                  presence_penalty=1, extra_body={"foo": 1})  # fmt: skip
    msg = _error(e, 400, "logit_bias")
    assert all(f in msg for f in ("logit_bias", "presence_penalty", "foo"))
    # what clients send by default, and hints that change nothing generated: accepted
    neutral = dict(presence_penalty=0, frequency_penalty=0, logit_bias={}, user="u",
                   extra_body={"metadata": {"k": "v"}, "store": False})  # fmt: skip
    r = client.completions.create(model="tiny", prompt="Q", max_tokens=2, n=2, best_of=2,
                                  **neutral)  # fmt: skip
    assert len(r.choices) == 2
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Q"}], max_tokens=2,
        response_format={"type": "text"}, tool_choice="none", **neutral)  # fmt: skip
    assert r.choices[0].message.content is not None
    # malformed bodies: 400 in the same shape, never a 500
    url = served[0] + "/chat/completions"
    for content in (b'{"messages": [', b"[1, 2]", b'"x"', b"", b"\xff\xfe"):
        r = httpx.post(url, content=content, headers={"content-type": "application/json"},
                       timeout=60)  # fmt: skip
        assert r.status_code == 400 and set(r.json()["error"]) == ERROR_KEYS, content


EXAMPLES = 30  # per operation and generation mode


def _fuzz(op, mode, codes: list[int]):
    """A hypothesis test of ``op``'s generated requests; status codes go to ``codes``."""
    from hypothesis import HealthCheck, given, settings

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
              suppress_health_check=list(HealthCheck), database=None)  # fmt: skip
    def check(case):
        # the served model (an unknown one is a 404 before anything else)
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = "tiny"
        if case.path_parameters and len(codes) % 2:
            case.path_parameters["model_id"] = "tiny"
        r = case.call(timeout=60)
        codes.append(r.status_code)
        assert r.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.body!r} -> {r.status_code}: {r.text[:300]}"
        )
        if r.status_code >= 400:
            assert set(r.json()["error"]) == ERROR_KEYS, r.text[:300]

    return check


def test_openapi_fuzz_finds_no_server_error(tmp_path_factory):
    """schemathesis over the server's own /openapi.json (valid and invalid requests): no
    5xx, every refusal in OpenAI's error shape, and requests that follow the schema are
    mostly answered. A model with a 64-token context keeps each generation short."""
    import schemathesis
    from schemathesis import GenerationMode

    with serving(tiny_teacher(tmp_path_factory.mktemp("fuzz"), n_positions=64)) as (url, _):
        spec = schemathesis.openapi.from_url(url.removesuffix("/v1") + "/openapi.json")
        ops = [r.ok() for r in spec.get_all_operations()]
        assert sorted(op.label for op in ops) == [
            "GET /v1/models", "GET /v1/models/{model_id}",
            "POST /v1/chat/completions", "POST /v1/completions"]  # fmt: skip
        answered: dict[tuple, list[int]] = {}
        for op in ops:
            # a GET has no invalid form to generate (no body, any string is an id)
            post = op.method.upper() == "POST"
            for mode in [GenerationMode.POSITIVE] + [GenerationMode.NEGATIVE] * post:
                _fuzz(op, mode, answered.setdefault((op.label, mode.value), []))()
    ok = {k: sum(c == 200 for c in v) for k, v in answered.items()}
    assert all(len(v) >= EXAMPLES // 2 for k, v in answered.items() if k[0] != "GET /v1/models")
    for op in ("POST /v1/chat/completions", "POST /v1/completions"):
        assert ok[op, "positive"] >= EXAMPLES // 4, ok  # requests that follow the schema
