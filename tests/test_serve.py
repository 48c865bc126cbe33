"""The OpenAI-compatible server against the official `openai` client, on real uvicorn servers in threads serving
a tiny random model: answers equal the library's own generation of each prompt alone (also when concurrent
requests share batches), streams add up to the same text, errors are OpenAI error objects with the right status,
and a client that goes away (or runs out of time) stops the model's work."""
import argparse
import contextlib
import http.client
import json
import math
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from torch import nn

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from illada.api import DiffusionLM  # noqa: E402
from illada.commands import serve as serve_command  # noqa: E402
from illada.config import preset  # noqa: E402
from illada.errors import IlladaError  # noqa: E402
from illada.model import build_model  # noqa: E402
from illada.serving import Limits, ServerSettings, create_app, serve_in_thread  # noqa: E402
from illada.tokenizer import byte_level_tokenizer  # noqa: E402

KEY = "test-key"
OPTS = dict(max_tokens=16, temperature=0)
EXTRA = {"block_length": 8}  # variable length, 8-token blocks, one token per step


def tiny_handle(seed: int = 0) -> DiffusionLM:
    """A byte-level tiny model with sharp random weights, so different prompts get different answers."""
    tok = byte_level_tokenizer()
    config = preset("tiny", name="tiny-serve", vocab_size=tok.vocab_size, max_seq_len=256, tie_word_embeddings=False,
                    mask_token_id=tok.mask_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id)
    model = build_model(config, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 1 / math.sqrt(p.shape[1]), generator=gen)
        model.lm_head.weight.mul_(3.0)
    return DiffusionLM(model=model.eval(), tokenizer=tok, config=config, name="tiny-serve")


class Slow(nn.Module):
    """Wraps a model so each forward pass takes at least `delay` seconds: long enough generations to cancel."""

    def __init__(self, inner: nn.Module, delay: float) -> None:
        super().__init__()
        self.inner, self.config, self.delay = inner, inner.config, delay

    def forward(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def lm():
    return tiny_handle()


@pytest.fixture(scope="module")
def server(lm):
    settings = ServerSettings(api_key=KEY, max_batch=4, queue_size=8, timeout=60,
                              limits=Limits(max_tokens=64, max_n=3, max_prompts=4, max_body_bytes=8192))
    app = create_app(lm, settings)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def slow_server():
    handle = tiny_handle()
    handle.model = Slow(handle.model, 0.01)
    app = create_app(handle, ServerSettings(api_key=KEY, timeout=60))
    with serve_in_thread(app) as url:
        yield url, app


def client(url, key=KEY):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def expected(lm, prompt, chat=False, **options):
    """The library's own answer for this prompt alone (the independent reference)."""
    options = {"max_new_tokens": 16, "block_length": 8, "temperature": 0.0, **options}
    if chat:
        return lm.chat(prompt, **options)
    return lm.generate(prompt, **options)


def raw(url, path, body=None, key=KEY, method=None, headers=None):
    """(status, decoded body) of a plain HTTP request."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method,
                                     headers={**({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), error.headers


def metrics(app):
    return app.state.metrics.snapshot()


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------------------------
def test_completion_matches_library_and_counts(server, lm):
    url, app = server
    before = metrics(app)
    r = client(url).completions.create(model="tiny-serve", prompt="ROMEO:", **OPTS, extra_body=EXTRA)
    want, output = lm.generate("ROMEO:", max_new_tokens=16, block_length=8, return_output=True)
    assert r.object == "text_completion" and r.model == "tiny-serve" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0]
    assert r.choices[0].text == want
    tokens = output.generated_tokens()[0]
    assert r.usage.prompt_tokens == len(lm.tokenizer.encode("ROMEO:"))
    assert r.usage.completion_tokens == len(tokens)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == ("length" if len(tokens) == 16 else "stop")
    after = metrics(app)
    assert after["nfe_total"] - before["nfe_total"] == output.nfe == r.model_extra["illada"]["nfe"]
    assert after["generated_tokens_total"] - before["generated_tokens_total"] == len(tokens)


def test_sampler_knobs_fixed_canvas_and_stop(server, lm):
    url, _ = server
    c = client(url)
    knobs = {"variable_length": False, "block_length": 8, "steps": 8, "remasking": "margin", "forbid_eos": True}
    r = c.completions.create(model="tiny-serve", prompt="To be", **OPTS, extra_body=knobs)
    want = expected(lm, "To be", variable_length=False, steps=8, remasking="margin", forbid_eos=True)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.model_extra["illada"]["nfe"] == 8

    full = expected(lm, "Now is the", forbid_eos=True)
    stop = full[3:5]
    cut = full[:full.find(stop)]
    r = c.completions.create(model="tiny-serve", prompt="Now is the", stop=[stop], **OPTS,
                             extra_body={**EXTRA, "forbid_eos": True})
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="tiny-serve", prompt="Now is the", stop=stop, stream=True, **OPTS,
                                    extra_body={**EXTRA, "forbid_eos": True})
    chunks = list(streamed)
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_committed_cache_matches_the_library(server, lm):
    # its frozen keys/values come from the passes that finished each block: a generation cut at a block boundary
    # and resumed would recompute them, so such rows run whole, not block by block
    url, _ = server
    knobs = {"block_length": 4, "cache": "committed", "forbid_eos": True, "threshold": 0.2}
    r = client(url).completions.create(model="tiny-serve", prompt="ROMEO:", max_tokens=16, temperature=0,
                                       extra_body=knobs)
    assert r.choices[0].text == expected(lm, "ROMEO:", max_new_tokens=16, **knobs)
    from illada.serving.batcher import schedule

    assert schedule(lm.sampling_config(max_new_tokens=16, **knobs))[1] is False


def test_stop_string_across_a_block_boundary(server, lm):
    """Rows run one block at a time; a stop string that starts in one block and ends in the next still stops."""
    url, _ = server
    full, output = lm.generate("To be", max_new_tokens=24, block_length=8, forbid_eos=True, return_output=True)
    first_block = lm.tokenizer.decode(output.generated_tokens()[0][:8], skip_special_tokens=True)
    stop = "'EE"
    assert stop not in first_block and -1 < full.find(stop) < len(first_block)  # the test's premise
    cut = full[:full.find(stop)]
    c = client(url)
    for stream in (False, True):
        r = c.completions.create(model="tiny-serve", prompt="To be", max_tokens=24, temperature=0, stop=stop,
                                 stream=stream, extra_body={"block_length": 8, "forbid_eos": True})
        chunks = list(r) if stream else [r]
        assert "".join(ch.choices[0].text for ch in chunks) == cut
        assert chunks[-1].choices[0].finish_reason == "stop"
        if not stream:  # tokens up to the end of the stop string, as the library counts them
            assert r.usage.completion_tokens == 10 and r.model_extra["illada"]["nfe"] == 16


@pytest.mark.parametrize("variable_length", [True, False])
def test_max_tokens_honoured_exactly_and_finish_reason(server, lm, variable_length):
    """max_tokens 12 with 8-token blocks gives 12 tokens in both modes (it used to give 8, reported as "length",
    or a 400 for the fixed canvas); a prompt near the context end gets what fits, next to a short prompt in the
    same batch, each equal to the library's answer alone; "length" only when the budget was used up."""
    url, _ = server
    c = client(url)
    knobs = {"block_length": 8, "forbid_eos": True, "variable_length": variable_length}
    if not variable_length:
        knobs["steps"] = 12
    long_prompt = "y" * 250  # context 256: 6 tokens of room
    r = c.completions.create(model="tiny-serve", prompt=["To be", long_prompt], max_tokens=12, temperature=0,
                             extra_body=knobs)
    for choice, prompt in zip(r.choices, ["To be", long_prompt]):
        with pytest.warns(UserWarning, match="capped") if prompt == long_prompt else contextlib.nullcontext():
            want, output = lm.generate(prompt, max_new_tokens=12, return_output=True, **knobs)
        assert choice.text == want and choice.finish_reason == "length"
        assert len(output.generated_tokens()[0]) == (12 if prompt == "To be" else 256 - 250)
    assert r.usage.completion_tokens == 12 + 6
    # a stop found before the budget: "stop", fewer tokens
    full = expected(lm, "Now is the", max_new_tokens=12, **knobs)
    stop = full[3:5]
    r = c.completions.create(model="tiny-serve", prompt="Now is the", max_tokens=12, temperature=0, stop=[stop],
                             extra_body=knobs)
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12


def test_n_and_prompt_lists(server, lm):
    url, _ = server
    r = client(url).completions.create(model="tiny-serve", prompt=["A", "Friends, Romans"], n=2, **OPTS,
                                       extra_body=EXTRA)
    a, b = expected(lm, "A"), expected(lm, "Friends, Romans")
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [a, a, b, b]
    assert r.usage.prompt_tokens == 1 + len("Friends, Romans")  # each prompt once
    stream = client(url).completions.create(model="tiny-serve", prompt=["A", "Friends, Romans"], n=2, stream=True,
                                            **OPTS, extra_body=EXTRA)
    texts = ["", "", "", ""]
    finish = [None] * 4
    for ch in stream:
        texts[ch.choices[0].index] += ch.choices[0].text
        finish[ch.choices[0].index] = finish[ch.choices[0].index] or ch.choices[0].finish_reason
    assert texts == [a, a, b, b] and finish == [c.finish_reason for c in r.choices]


def test_chat_and_streaming_chat(server, lm):
    url, _ = server
    c = client(url)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}]
    want = expected(lm, messages, chat=True)
    r = c.chat.completions.create(model="tiny-serve", messages=messages, **OPTS, extra_body=EXTRA)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content.strip() == want
    stream = c.chat.completions.create(model="tiny-serve", messages=messages, stream=True,
                                       stream_options={"include_usage": True}, **OPTS, extra_body=EXTRA)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert content == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_stream_framing_and_canvas_extension(server, lm):
    """Raw SSE: `data:` events, [DONE] last, and the canvas updates replay the library's own denoising."""
    url, _ = server
    status, text, headers = raw(url, "/v1/completions", {"prompt": "What light", "max_tokens": 16, "block_length": 8,
                                                          "stream": True, "illada_stream_canvas": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert text.endswith("data: [DONE]\n\n")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    payloads = [json.loads(e[len("data: "):]) for e in events[:-1]]
    updates = [p["illada"] for p in payloads if "commits" in p.get("illada", {})]
    final = [p["illada"] for p in payloads if p.get("illada", {}).get("done")]

    _, output = lm.generate("What light", max_new_tokens=16, block_length=8, return_output=True)
    assert len(updates) == output.nfe  # one update per step (no CFG: one forward each)
    assert [u["step"] for u in updates] == list(range(len(updates)))
    canvas: dict[int, tuple[str, int]] = {}
    for u in updates:
        for position, token_text, step in u["commits"]:
            assert position not in canvas and step == u["step"]
            canvas[position] = (token_text, step)
    tokens = output.generated_tokens()[0]
    assert final == [{"done": True, "length": len(tokens), "nfe": output.nfe}]
    assert [canvas[i][0] for i in range(len(tokens))] == [lm.tokenizer.decode([t]) for t in tokens]
    text_deltas = "".join(p["choices"][0]["text"] for p in payloads)
    assert text_deltas == lm.generate("What light", max_new_tokens=16, block_length=8)


def test_concurrent_requests_share_batches_and_match(server, lm):
    url, app = server
    prompts = ["To be", "Now is the winter of", "A", "O Romeo, Romeo! wherefore", "Friends, Romans", "What light"]
    want = {p: expected(lm, p) for p in prompts}
    alone_nfe = sum(lm.generate(p, max_new_tokens=16, block_length=8, return_output=True)[1].nfe for p in prompts)
    assert len(set(want.values())) > 1  # the check below could catch mixed-up answers
    # A seeded sampled request runs alone (its draws must not depend on other rows): as the library gives it.
    sampled = {"temperature": 0.9, "seed": 7}
    want["sampled"] = expected(lm, "To be", temperature=0.9, seed=7)
    got: dict[str, str] = {}
    errors = []

    def ask(prompt):
        try:
            if prompt == "sampled":
                r = client(url).completions.create(model="tiny-serve", prompt="To be", max_tokens=16, **sampled,
                                                   extra_body=EXTRA)
            else:
                r = client(url).completions.create(model="tiny-serve", prompt=prompt, **OPTS, extra_body=EXTRA)
            got[prompt] = r.choices[0].text
        except Exception as error:  # reported below
            errors.append(error)

    before = metrics(app)
    with app.state.batcher.hold():  # let all seven pile up so the worker must batch them
        threads = [threading.Thread(target=ask, args=(p,)) for p in [*prompts, "sampled"]]
        for t in threads:
            t.start()
        wait_for(lambda: app.state.batcher.queue_depth == len(threads))
    for t in threads:
        t.join(60)
    assert not errors and got == want
    after = metrics(app)
    assert after["max_batch_rows"] == 4
    sampled_nfe = 16
    assert after["nfe_total"] - before["nfe_total"] < alone_nfe + sampled_nfe  # forward passes were shared


def test_queue_full_is_429_and_server_recovers(server, lm):
    url, app = server
    results, errors = [], []

    def ask():
        try:
            results.append(client(url).completions.create(model="tiny-serve", prompt="A", **OPTS,
                                                          extra_body=EXTRA).choices[0].text)
        except Exception as error:
            errors.append(error)

    with app.state.batcher.hold():
        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        wait_for(lambda: app.state.batcher.queue_depth == 8)
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).completions.create(model="tiny-serve", prompt="A", **OPTS, extra_body=EXTRA)
        assert caught.value.status_code == 429
        assert caught.value.body["code"] == "queue_full" and caught.value.body["type"] == "rate_limit_error"
    for t in threads:
        t.join(60)
    assert not errors and results == [expected(lm, "A")] * 8


@pytest.mark.parametrize("body, status, param, code", [
    (b"{not json", 400, None, "invalid_json"),
    (b"[1, 2]", 400, None, "invalid_json"),
    ({"prompt": 7}, 400, "prompt", "invalid_type"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "invalid_type"),
    ({"prompt": "x", "max_tokens": 65}, 400, "max_tokens", "invalid_value"),
    ({"prompt": "x", "n": 4}, 400, "n", "invalid_value"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", "invalid_value"),
    ({"prompt": "x", "cache": "full"}, 400, "cache", "invalid_value"),
    ({"prompt": "x", "stepz": 3}, 400, "stepz", "unknown_parameter"),
    ({"prompt": "x", "logprobs": 3}, 400, "logprobs", "unsupported_parameter"),
    ({"prompt": "y" * 300}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": [1, 2, 99999]}, 400, "prompt", "invalid_value"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found"),
    ({"prompt": "z" * 9000}, 413, None, "body_too_large"),
])
def test_bad_requests_get_openai_errors(server, body, status, param, code):
    url, _ = server
    got, text, _ = raw(url, "/v1/completions", body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code


def test_chat_errors_and_client_exceptions(server):
    url, _ = server
    c = client(url)
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model="tiny-serve", messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny-serve", messages=[])
    with pytest.raises(openai.AuthenticationError):
        client(url, key="wrong").completions.create(model="tiny-serve", prompt="x", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x", max_tokens=4)
    status, text, _ = raw(url, "/v1/nothing", key=None)
    assert status == 404 and json.loads(text)["error"]["message"]
    assert raw(url, "/health", key=None)[0] == 200  # still up after all of it


def test_auth_on_every_route_but_health_and_page(server):
    url, _ = server
    for path in ("/v1/models", "/metrics"):
        status, text, _ = raw(url, path, key=None)
        assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
    status, _, _ = raw(url, "/v1/completions", {"prompt": "x"}, key=None)
    assert status == 401
    status, text, _ = raw(url, "/health", key=None)
    assert status == 200 and json.loads(text)["status"] == "ok"
    status, text, headers = raw(url, "/", key=None)
    assert status == 200 and headers["content-type"].startswith("text/html") and "illada" in text


def test_models_and_metrics(server):
    url, app = server
    ids = [m.id for m in client(url).models.list()]
    assert ids == ["tiny-serve"]
    status, text, headers = raw(url, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if line and line[0] != "#"}
    snapshot = metrics(app)
    for name in ("nfe_total", "generated_tokens_total", "batches_total", "queue_depth"):
        assert values[f"illada_{name}"] == snapshot[name]
    assert any(k.startswith('illada_requests_total{route="/v1/completions",status="200"}') for k in values)
    status, text, _ = raw(url, "/metrics?format=json")
    assert json.loads(text)["nfe_total"] == snapshot["nfe_total"]


# ---------------------------------------------------------------------------------------------------------------
# Cancellation: on a model slowed to >= 10 ms per forward pass; the full generation below is 128 passes.
LONG = {"prompt": "Once", "max_tokens": 128, "block_length": 8, "forbid_eos": True}


def _settled(app, before):
    wait_for(lambda: app.state.batcher.idle() and metrics(app)["rows_cancelled_total"] > before["rows_cancelled_total"])
    time.sleep(0.05)
    return metrics(app)


def assert_stopped(before, after, max_nfe):
    """The row was cancelled (mid-block: its batch stopped at the next step; at a block boundary: it was
    dropped) and the model did far fewer passes than the whole generation needs."""
    assert after["rows_cancelled_total"] - before["rows_cancelled_total"] == 1
    assert after["rows_finished_total"] == before["rows_finished_total"]
    assert after["batches_stopped_total"] - before["batches_stopped_total"] in (0, 1)
    assert after["nfe_total"] - before["nfe_total"] < max_nfe


def test_disconnect_during_stream_stops_the_batch(slow_server):
    url, app = slow_server
    before = metrics(app)
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    one_block = {**LONG, "block_length": 128, "stream": True, "illada_stream_canvas": True}  # an event per step
    conn.request("POST", "/v1/completions", body=json.dumps(one_block),
                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.read(6) == b"data: "  # generation has started
    response.close()
    conn.close()
    after = _settled(app, before)
    assert_stopped(before, after, max_nfe=64)
    assert after["batches_stopped_total"] - before["batches_stopped_total"] == 1  # cancelled mid-block


def test_disconnect_without_stream_and_health_stays_responsive(slow_server):
    url, app = slow_server
    before = metrics(app)
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    body = json.dumps(LONG).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                 b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode() +
                 b"\r\n\r\n" + body)
    wait_for(lambda: metrics(app)["nfe_total"] > before["nfe_total"])  # the model is busy with it
    began = time.perf_counter()
    assert raw(url, "/health", key=None)[0] == 200
    assert time.perf_counter() - began < 1.0  # the event loop is not blocked by the model
    sock.close()
    assert_stopped(before, _settled(app, before), max_nfe=100)


def test_rows_join_a_running_batch_at_block_boundaries(slow_server, lm):
    url, app = slow_server
    answers = {}

    def ask(name, prompt, max_tokens):
        r = client(url).completions.create(model="tiny-serve", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           extra_body={"block_length": 8, "forbid_eos": True})
        answers[name] = (r.choices[0].text, r.model_extra["illada"]["nfe"])

    before = metrics(app)
    first = threading.Thread(target=ask, args=("first", "Once", 48))  # 6 blocks of 8 steps
    first.start()
    wait_for(lambda: metrics(app)["nfe_total"] > before["nfe_total"])
    with app.state.batcher.hold():  # the worker finishes its block, then waits
        second = threading.Thread(target=ask, args=("second", "Friends, Romans", 16))
        second.start()
        wait_for(lambda: app.state.batcher.queue_depth == 1)
    first.join(60)
    second.join(60)
    want_first = lm.generate("Once", max_new_tokens=48, block_length=8, forbid_eos=True, return_output=True)
    want_second = lm.generate("Friends, Romans", max_new_tokens=16, block_length=8, forbid_eos=True,
                              return_output=True)
    assert answers["first"] == (want_first[0], want_first[1].nfe)
    assert answers["second"] == (want_second[0], want_second[1].nfe)
    after = metrics(app)
    assert after["max_batch_rows"] == 2  # the second request joined the first one's batch
    assert after["nfe_total"] - before["nfe_total"] == 48  # its 16 passes were all shared


def test_timeout_is_504_and_cancels(slow_server):
    url, app = slow_server
    app.state.settings.timeout = 0.3
    try:
        before = metrics(app)
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).completions.create(model="tiny-serve", prompt="Once", max_tokens=128,
                                           extra_body={"block_length": 8, "forbid_eos": True})
        assert caught.value.status_code == 504 and caught.value.body["code"] == "timeout"
        after = _settled(app, before)
        assert after["timed_out_total"] - before["timed_out_total"] == 1
        assert_stopped(before, after, max_nfe=100)
    finally:
        app.state.settings.timeout = 60


# ---------------------------------------------------------------------------------------------------------------
def _serve_args(*argv):
    parser = argparse.ArgumentParser()
    serve_command.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_serve_command_options(monkeypatch):
    monkeypatch.setenv("ILLADA_API_KEY", "from-env")
    settings = serve_command.settings_from_args(_serve_args("--max-batch", "3", "--max-n", "2"))
    assert settings.api_key == "from-env" and settings.max_batch == 3 and settings.limits.max_n == 2
    assert serve_command.settings_from_args(_serve_args("--api-key", "flag")).api_key == "flag"
    args = _serve_args()
    assert args.host == "127.0.0.1" and args.port == 8000
    for bad in (["--max-batch", "0"], ["--timeout", "0"], ["--port", "70000"],
                ["--default-max-tokens", "9", "--max-tokens", "8"]):
        with pytest.raises(IlladaError):
            serve_command.settings_from_args(_serve_args(*bad))
    with pytest.raises(IlladaError, match="no model"):
        serve_command.run(_serve_args("--model", "/nonexistent/model", "--port", "0"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        with pytest.raises(IlladaError, match="cannot listen"):
            serve_command.listen("127.0.0.1", busy.getsockname()[1])
    finally:
        busy.close()


# ------------------------------------------------------------------------------------------------- infilling
TEMPLATE = "The capital of France is <|mask:3|>, a city known for <|mask:8|>."


def test_suffix_insert_mode_fills_between_prompt_and_suffix(server, lm):
    url, app = server
    before = metrics(app)
    r = client(url).completions.create(model="tiny-serve", prompt="The cat ", suffix=" on the mat.", max_tokens=5,
                                       temperature=0)
    want, out = lm.infill("The cat ", " on the mat.", 5, return_output=True)
    assert r.choices[0].text == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == len("The cat  on the mat.")
    assert metrics(app)["nfe_total"] - before["nfe_total"] == out.nfe == r.model_extra["illada"]["nfe"]
    # a list of prompts with n and sampler knobs: each row as alone
    r = client(url).completions.create(model="tiny-serve", prompt=["A ", "Be "], suffix=" end", max_tokens=4, n=2,
                                       temperature=0, extra_body={"steps": 2, "remasking": "margin"})
    assert [c.text for c in r.choices] == [lm.infill(p, " end", 4, steps=2, remasking="margin")
                                           for p in ("A ", "A ", "Be ", "Be ")]


def test_placeholders_in_the_prompt_when_the_request_opts_in(server, lm):
    url, _ = server
    c = client(url)
    r = c.completions.create(model="tiny-serve", prompt=TEMPLATE, max_tokens=4, temperature=0,
                             extra_body={"illada_infill": True, "threshold": 0.3})
    assert r.choices[0].text == lm.infill(TEMPLATE, threshold=0.3)
    assert r.choices[0].text.startswith("The capital of France is ") and r.choices[0].text.endswith(".")
    plain = c.completions.create(model="tiny-serve", prompt=TEMPLATE, **OPTS, extra_body=EXTRA)
    assert plain.choices[0].text == expected(lm, TEMPLATE)  # without the opt-in a placeholder is plain text
    status, text, _ = raw(url, "/v1/completions", {"prompt": "x <|mask:3|> y", "illada_infill": True,
                                                   "illada_allow_shorter": True, "temperature": 0})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == lm.infill("x <|mask:3|> y",
                                                                                 allow_shorter=True)
    status, text, _ = raw(url, "/v1/completions", {"prompt": "x", "suffix": "y", "max_tokens": 3, "steps": 10**30})
    assert status == 200 and json.loads(text)["choices"][0]["text"] == lm.infill("x", "y", 3)


@pytest.mark.parametrize("body, expect", [
    ({"prompt": "The cat ", "suffix": " on the mat.", "max_tokens": 6},
     lambda lm: lm.infill("The cat ", " on the mat.", 6, return_output=True)),
    ({"prompt": TEMPLATE, "illada_infill": True, "max_tokens": 4}, lambda lm: lm.infill(TEMPLATE, return_output=True)),
])
def test_infill_streams_each_committed_pass(server, lm, body, expect):
    """Streamed infill: the text deltas add up to the non-streamed answer (each sent once final: up to the first
    position still masked), and the canvas updates replay the library's passes, one per pass."""
    url, _ = server
    status, text, _ = raw(url, "/v1/completions", {**body, "temperature": 0, "stream": True,
                                                   "illada_stream_canvas": True})
    assert status == 200 and text.endswith("data: [DONE]\n\n")
    payloads = [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e and e != "data: [DONE]"]
    want, output = expect(lm)
    updates = [p["illada"] for p in payloads if "commits" in p.get("illada", {})]
    assert len(updates) == output.nfe and [u["step"] for u in updates] == list(range(output.nfe))
    assert sum(len(u["commits"]) for u in updates) == output.filled  # every hole position committed once
    deltas = [p["choices"][0]["text"] for p in payloads if p.get("choices") and p["choices"][0]["text"]]
    assert "".join(deltas) == want
    if body.get("illada_infill"):  # the text before the first hole is final from the first pass
        assert len(deltas) > 1 and deltas[0].startswith("The capital of France is ")


@pytest.mark.parametrize("body, param, code", [
    ({"prompt": "a <|mask:3", "illada_infill": True}, "prompt", "invalid_placeholder"),
    ({"prompt": "a <|mask:0|>", "illada_infill": True}, "prompt", "invalid_placeholder"),
    ({"prompt": "a <|mask:-2|>", "illada_infill": True}, "prompt", "invalid_placeholder"),
    ({"prompt": "no holes", "illada_infill": True}, "prompt", "invalid_placeholder"),
    ({"prompt": "y" * 250 + "<|mask:10|>", "illada_infill": True}, "prompt", "context_length_exceeded"),
    ({"prompt": "a <|mask:65|>", "illada_infill": True}, "prompt", "invalid_value"),
    ({"prompt": "a", "suffix": "b", "illada_infill": True}, "suffix", "invalid_value"),
    ({"prompt": "a", "suffix": 3}, "suffix", "invalid_type"),
    ({"prompt": [1, 2], "suffix": "b"}, "prompt", "invalid_type"),
    ({"prompt": "a", "suffix": "b", "illada_stream_canvas": True}, "illada_stream_canvas", "invalid_value"),
    ({"prompt": "a", "suffix": "b", "block_length": 4}, "block_length", "unsupported_parameter"),
    ({"prompt": "a", "suffix": "b", "cache": "prefix", "cache_refresh": 0}, "cache_refresh", "invalid_value"),
    ({"prompt": "a", "suffix": "b", "steps": 2, "threshold": 0.5, "factor": 1.0}, None, "invalid_value"),
    ({"prompt": "a", "suffix": "b", "illada_infill": "yes"}, "illada_infill", "invalid_type"),
])
def test_bad_infill_requests_get_openai_400s(server, body, param, code):
    url, _ = server
    status, text, _ = raw(url, "/v1/completions", body)
    assert status == 400, text
    error = json.loads(text)["error"]
    assert error["param"] == param and error["code"] == code and "\n" not in error["message"]
