"""`swarm api` as a user meets it: a real `swarm api` process (uvicorn) in front of a real swarm (in-process
peers with real p2pd), driven with the official `openai` package and plain HTTP.

The text equals what the client library generates for the same prompt and seed, token for token: greedy
and seeded sampling, streaming and not, chat and completions, concurrent requests; errors come back in
OpenAI's shape with the right status; a client that leaves mid-stream frees its session at once.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import openai
import pytest
import torch
from transformers import AutoTokenizer

from client import ClientConfig, DistributedModelForCausalLM
from client.api import chat_prompt
from client.launcher import Proc, spawn

pytestmark = pytest.mark.slow
MODEL_ID = "api-llama"
KEY = "test-key"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a swarm animal."}]


@pytest.fixture(scope="module")
def api(inprocess_swarm, tiny_model_path):
    """(model path, servers, base URL of an API with a key, a client-library model, tokenizer)."""
    path = tiny_model_path("llama")
    servers = inprocess_swarm.start_peers(path, ["0:3", "3:6"], model_id=MODEL_ID)
    procs: list[Proc] = []
    library = None
    try:
        proc = start_api(path, inprocess_swarm.initial_peers, "--api-key", KEY)
        procs.append(proc)
        config = ClientConfig(initial_peers=tuple(inprocess_swarm.initial_peers), model_id=MODEL_ID)
        library = DistributedModelForCausalLM.from_pretrained(path, client_config=config)
        yield path, servers, proc.base_url, library, AutoTokenizer.from_pretrained(path)
    finally:
        if library is not None:
            library.shutdown()
        for proc in procs:
            proc.stop()
        for server in servers:
            inprocess_swarm.stop_peer(server)


def start_api(path, initial_peers, *extra: str, model_id: str = MODEL_ID) -> Proc:
    proc = spawn("api", ["api", "--model", str(path), "--initial-peers", *initial_peers, "--model-id", model_id,
                         "--port", "0", *extra])
    line = proc.wait_line(lambda l: l.startswith("api at "), 120)
    proc.base_url = line.split()[2]
    return proc


def openai_client(base_url: str, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def library_text(library, tokenizer, ids: list[int], max_tokens: int, seed: int | None = None, **sampling) -> str:
    """What the client library generates: greedy, or seeded sampling as the API documents it."""
    kwargs = dict(do_sample=False)
    if seed is not None:
        torch.manual_seed(seed)
        kwargs = dict(do_sample=True, top_k=0, **sampling)
    out = library.generate(torch.tensor([ids]), max_new_tokens=max_tokens, pad_token_id=0, **kwargs)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def post(url: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_headers_only(url: str, content_length: int, key: str | None = KEY) -> tuple[int, dict]:
    """A POST that announces a body of `content_length` bytes and sends none: the server must answer from
    the headers. (Sending a body the server refuses unread races its close: the client may get a broken
    pipe or a reset instead of the answer.)"""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(content_length))
        if key:
            conn.putheader("Authorization", f"Bearer {key}")
        conn.endheaders()
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def test_completions_and_chat_equal_the_client_library(api):
    path, _, url, library, tokenizer = api
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    prompt = "A swarm of bees"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    greedy = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    assert greedy.choices[0].text == library_text(library, tokenizer, ids, 12)
    assert greedy.choices[0].finish_reason == "length"
    assert (greedy.usage.prompt_tokens, greedy.usage.completion_tokens) == (len(ids), 12)

    chat_ids = chat_prompt(tokenizer, CHAT)
    expected = library_text(library, tokenizer, chat_ids, 10, seed=7, temperature=0.8, top_p=0.9)
    reply = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=10, temperature=0.8,
                                           top_p=0.9, seed=7)
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=10, temperature=0.8, top_p=0.9,
                                            seed=7, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == len(chat_ids)
    streamed = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == greedy.choices[0].text


def test_stop_strings_and_several_choices(api):
    path, _, url, library, tokenizer = api
    client = openai_client(url)
    prompt = "The peers"
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = library_text(library, tokenizer, ids, 16)
    stop = full[5:8]
    cut = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    two = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=1.0, seed=11, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    for i, choice in enumerate(two.choices):  # choice i samples with seed + i
        assert choice.text == library_text(library, tokenizer, ids, 6, seed=11 + i, temperature=1.0)


def test_concurrent_chats_are_concurrent_sessions_and_exact(api):
    path, servers, url, library, tokenizer = api
    client = openai_client(url)
    chat_ids = chat_prompt(tokenizer, CHAT)
    expected = [library_text(library, tokenizer, chat_ids, 12, seed=s, temperature=0.9) for s in range(8)]
    got: list = [None] * 8
    peak = [0]

    def watch():
        while any(g is None for g in got):
            peak[0] = max(peak[0], servers[0].sessions.active)
            time.sleep(0.005)

    def ask(seed: int):
        reply = client.chat.completions.create(model=MODEL_ID, messages=CHAT, max_tokens=12, temperature=0.9,
                                               seed=seed, stream=seed % 2 == 0)
        got[seed] = ("".join(c.choices[0].delta.content or "" for c in reply if c.choices) if seed % 2 == 0
                     else reply.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(s,)) for s in range(8)] + [threading.Thread(target=watch)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == expected
    assert peak[0] >= 2  # requests overlapped on the peers as sessions of their own


def test_errors_in_openai_shape(api, inprocess_swarm):
    path, _, url, _, _ = api
    completions = f"{url}/completions"
    cases = [
        (b"{not json", KEY, 400, "invalid_json"),
        (b"[1, 2]", KEY, 400, None),
        ({"model": MODEL_ID, "prompt": "x", "max_tokens": "5"}, KEY, 400, None),  # no coercion
        ({"model": MODEL_ID, "prompt": "x", "temperature": 3}, KEY, 400, None),
        ({"model": MODEL_ID}, KEY, 400, None),
        ({"model": "gpt-4", "prompt": "x"}, KEY, 404, "model_not_found"),
        ({"model": MODEL_ID, "prompt": "x", "max_tokens": 4000}, KEY, 400, "context_length_exceeded"),
        ({"model": MODEL_ID, "prompt": "x", "logprobs": 2}, KEY, 400, None),
        ({"model": MODEL_ID, "prompt": "x"}, None, 401, "invalid_api_key"),
        ({"model": MODEL_ID, "prompt": "x"}, "wrong", 401, "invalid_api_key"),
    ]
    for body, key, status, code in cases:
        got_status, reply = post(completions, body, key)
        assert got_status == status, (body if isinstance(body, bytes) else str(body)[:80], got_status, reply)
        error = reply["error"]
        assert error["message"] and error["type"] and (code is None or error["code"] == code), reply
    status, reply = post_headers_only(completions, 2_000_000)  # refused on its Content-Length, unread
    assert status == 413 and reply["error"]["code"] == "request_too_large", reply
    # the openai package reads the same shape into its own exceptions
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        openai_client(url).chat.completions.create(model="gpt-4", messages=CHAT)
    # blocks no peer serves: 503 naming them, soon (the server's route wait)
    lonely = start_api(path, inprocess_swarm.initial_peers, "--wait-for-route-s", "0", model_id="no-such-model")
    try:
        status, reply = post(f"{lonely.base_url}/completions", {"model": "no-such-model", "prompt": "x"}, None)
        assert status == 503 and reply["error"]["code"] == "missing_blocks", reply
        assert "0:6" in reply["error"]["message"]
    finally:
        lonely.stop()


def test_limits_rate_and_overload(api, inprocess_swarm):
    path = api[0]
    proc = start_api(path, inprocess_swarm.initial_peers, "--rate-limit-rpm", "3", "--max-concurrency", "1",
                     "--queue-timeout-s", "0.2")
    try:
        url = f"{proc.base_url}/completions"
        slow = {"model": MODEL_ID, "prompt": "hold the only session", "max_tokens": 300, "temperature": 0}
        holder = threading.Thread(target=post, args=(url, slow, None))
        holder.start()
        time.sleep(1.0)  # the one session slot is taken
        status, reply = post(url, {"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, None)
        assert status == 503 and reply["error"]["code"] == "overloaded", reply
        holder.join(120)
        assert post(url, {"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, None)[0] == 200  # the 3rd
        status, reply = post(url, {"model": MODEL_ID, "prompt": "x", "max_tokens": 2}, None)
        assert status == 429 and reply["error"]["code"] == "rate_limit_exceeded", reply  # the 4th in a minute
    finally:
        proc.stop()


def test_leaving_mid_stream_frees_the_session(api):
    _, servers, url, _, _ = api
    # greedy from "a", the tiny model meets EOS only after 1843 tokens: this stream ends only by leaving
    body = json.dumps({"model": MODEL_ID, "prompt": "a", "max_tokens": 2000, "temperature": 0,
                       "stream": True}).encode()
    served = servers[0].steps_served
    request = urllib.request.Request(f"{url}/completions", body, {"Content-Type": "application/json",
                                                                   "Authorization": f"Bearer {KEY}"})
    reply = urllib.request.urlopen(request, timeout=60)
    lines = [reply.readline() for _ in range(6)]  # the stream is flowing
    assert all(b'"finish_reason": null' in line for line in lines[::2]), lines
    assert all(server.sessions.active == 1 for server in servers)
    reply.close()  # the HTTP client goes away mid-stream
    deadline = time.monotonic() + 3
    while any(server.sessions.active for server in servers):
        assert time.monotonic() < deadline, [server.sessions.active for server in servers]
        time.sleep(0.05)
    assert servers[0].steps_served - served < 500  # stopped early, not run to its end
