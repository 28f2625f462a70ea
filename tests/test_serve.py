"""`tvm-anyprec serve` on loopback with the official `openai` client, on the real model (SmolLM2-135M-Instruct):
completions and chat, streamed and not, bits 3 and 8 from one server (different text, each equal to the CLI's
at the same settings), seed reproducibility, 401 without the key, 4xx on bad requests (and the server keeps
serving), and a bounded load test: 64 requests, 8 at a time, mixed bits and streaming, none lost or mixed up,
the server's memory flat across rounds."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-123"
PROMPT = "The capital of France is"
QUESTION = "What is 2+2?"


def _http(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60):
    """-> (status, parsed JSON body) of one raw HTTP request (stdlib only)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(real_artifact):
    port = _free_port()
    p = subprocess.Popen([sys.executable, "-m", "tvm_anyprec.cli", "serve", str(real_artifact), "--port", str(port),
                          "--api-key", KEY], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert p.poll() is None, p.stdout.read()[-3000:]
        try:
            if _http("GET", url + "/health", timeout=1)[0] == 200:
                break
        except OSError:
            pass
        assert time.time() < deadline, "server did not come up"
        time.sleep(0.5)
    yield url, p
    p.terminate()
    p.wait(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _cli(artifact, *args) -> str:
    r = subprocess.run([sys.executable, "-m", "tvm_anyprec.cli", "run", str(artifact), *args], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_models_and_health(server, client):
    models = client.models.list().data
    assert len(models) == 1 and models[0].owned_by == "tvm-anyprec"
    assert _http("GET", server[0] + "/health")[1]["status"] == "ok"


def test_completions_bits_3_and_8_equal_the_cli(client, real_artifact):
    out = {}
    for b in (3, 8):
        r = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=8,
                                      temperature=0, extra_body={"bits": b})
        out[b] = r.choices[0].text
        assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
        assert _cli(real_artifact, "--prompt", PROMPT, "--bits", str(b), "--max-new-tokens", "8") == \
            PROMPT + out[b] + "\n"
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=8, temperature=0, stream=True,
            extra_body={"bits": b}) if c.choices)
        assert streamed == out[b]
    assert out[3] != out[8]


def test_chat_streaming_and_not_equal_the_cli(client, real_artifact):
    msgs = [{"role": "user", "content": QUESTION}]
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs, max_tokens=12,
                                       temperature=0, extra_body={"bits": 8})
    text = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and text
    chunks = list(client.chat.completions.create(model=client.models.list().data[0].id, messages=msgs,
                                                 max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}, extra_body={"bits": 8}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert _cli(real_artifact, "--chat", "--prompt", QUESTION, "--bits", "8", "--max-new-tokens", "12") == text + "\n"


def test_seed_reproducible(client):
    def once(seed):
        return client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=10,
                                         temperature=1.0, seed=seed, extra_body={"bits": 4}).choices[0].text
    assert once(5) == once(5)
    assert len({once(s) for s in (1, 2, 3)}) > 1


def test_auth_and_bad_requests(server, client):
    url = server[0]
    assert _http("GET", url + "/v1/models")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = [b"{not json", b'{"prompt": "hi", "no_such_field": 1}', b'{"prompt": "hi", "bits": 9}',
           b'{"prompt": "hi", "max_tokens": 100000}', b'{"prompt": "hi", "temperature": -1}',
           b'{"messages": []}']
    for body, path in zip(bad, ["completions"] * 5 + ["chat/completions"]):
        status, err = _http("POST", f"{url}/v1/{path}", body, h)
        assert 400 <= status < 500 and err["error"]["message"], (body, status, err)
    long = json.dumps({"prompt": "word " * 9000, "max_tokens": 4}).encode()
    status, err = _http("POST", url + "/v1/completions", long, h)
    assert status == 400 and "context" in err["error"]["message"], err
    ok = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=2,
                                   temperature=0)
    assert ok.choices[0].text                       # still serving


def _rss(pid) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def test_load_64_requests_8_at_a_time(server, client, capsys):
    """Each request's expected text (greedy at its bit-width, measured alone first) must come back to it: a
    mix-up between concurrent requests would show as a different text."""
    model = client.models.list().data[0].id
    prompts = [f"{PROMPT} {w}" for w in ("Paris", "a", "the", "one")]
    want = {(p, b): client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0,
                                              extra_body={"bits": b}).choices[0].text
            for p in prompts for b in (3, 8)}

    def one(i):
        p, b, stream = prompts[i % 4], (3, 8)[(i // 4) % 2], i % 3 == 0
        t0 = time.perf_counter()
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(
                model=model, prompt=p, max_tokens=6, temperature=0, stream=True, extra_body={"bits": b})
                if c.choices)
        else:
            text = client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0,
                                             extra_body={"bits": b}).choices[0].text
        return b, text == want[(p, b)], time.perf_counter() - t0

    rss = []
    results = []
    t0 = time.perf_counter()
    for _round in range(2):
        with ThreadPoolExecutor(8) as ex:
            results += list(ex.map(one, range(32)))
        rss.append(_rss(server[1].pid))
    wall = time.perf_counter() - t0
    with ThreadPoolExecutor(8) as ex:                # a third round, for the memory only
        assert all(ok for _b, ok, _t in ex.map(one, range(32)))
    rss.append(_rss(server[1].pid))
    assert len(results) == 64 and all(ok for _b, ok, _t in results)
    # no growth across rounds: one KV cache is 377 MB, 8 requests hold 4 at a time
    assert rss[2] - rss[1] < 64 << 20 and rss[1] - rss[0] < 128 << 20, rss
    with capsys.disabled():
        for b in (3, 8):
            lat = sorted(t for bb, _ok, t in results if bb == b)
            print(f"\nserve load: {b}-bit p50 {lat[len(lat) // 2] * 1e3:.0f} ms, p99 {lat[-1] * 1e3:.0f} ms "
                  f"({len(lat)} requests)", end="")
        print(f"; {64 / wall:.2f} requests/s overall, server RSS after each round "
              + " -> ".join(f"{r >> 20}" for r in rss) + " MiB")


def test_client_that_disconnects_stops_its_generation(server, client):
    """A streamed request for 3000 tokens, dropped after its first chunk: the server stops it at the next
    token, so a short request right after is answered in seconds, not after the 3000 tokens (~1 minute)."""
    import http.client

    host, port = server[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"prompt": PROMPT, "max_tokens": 3000, "temperature": 0, "stream": True, "bits": 3})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                    "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.readline().startswith(b"data: ")
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    t0 = time.perf_counter()
    r = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=2, temperature=0)
    assert r.choices[0].text and time.perf_counter() - t0 < 20
    served = _http("GET", server[0] + "/health")[1]
    assert served["waiting"] == 0
