"""``specalign serve``: a real server subprocess on a free loopback port, driven with the openai client and httpx.

One server (tiny model, Best-of-N of 2 by default, queue of 2) serves every test of this module; the
tests run in file order and each leaves the server idle.
"""

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest

from specalign.cli import main

ROOT = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "hello"}]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def launch(folder: Path, config_yaml: str, model: str):
    """``specalign serve`` as a subprocess on a free loopback port (``--port 0``: the port it prints)."""
    config = folder / "serve.yaml"
    config.write_text(config_yaml)
    log = folder / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "specalign.cli", "serve", "--config", str(config),
                                 "--host", "127.0.0.1", "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline, port = time.time() + 300, None
        while port is None:
            found = re.search(r"specalign serve: .* on http://127\.0\.0\.1:(\d+)/v1", log.read_text(errors="replace"))
            port = int(found.group(1)) if found else None
            assert proc.poll() is None, f"server exited:\n{log.read_text()}"
            assert time.time() < deadline, f"server did not start:\n{log.read_text()}"
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.time() < deadline, f"server not answering:\n{log.read_text()}"
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        yield SimpleNamespace(url=url, proc=proc, pid=proc.pid, log=log, client=client, model=model)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    yaml = (f"model: {tiny_dir}\nmethod: best-of-n\nn: 2\nscorer: loglik:self\nmax_new_tokens: 16\n"
            "served_model_name: tiny\nqueue_size: 2\nmax_candidates: 256\n")
    with launch(tmp_path_factory.mktemp("serve"), yaml, "tiny") as running:
        yield running


def health(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


def wait_idle(server, timeout: float = 60) -> dict:
    deadline = time.time() + timeout
    while True:
        state = health(server)
        if state["queue"]["running"] == 0 and state["queue"]["waiting"] == 0:
            return state
        assert time.time() < deadline, state
        time.sleep(0.1)


def chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_models_and_health(server):
    assert [m.id for m in server.client.models.list()] == ["tiny"]
    state = health(server)
    assert state["status"] == "ok" and state["method"] == "best-of-n" and state["queue"]["size"] == 2
    assert httpx.get(f"{server.url}/v1/models/nope").status_code == 404


def decode_locally(tiny_dir, prompt: str, **config) -> dict:
    """What ``specalign decode`` answers for this prompt and these settings (same seed, same record)."""
    from specalign.decode import DecodeConfig, Decoder
    return Decoder(DecodeConfig(model=tiny_dir, scorer="loglik:self", **config)).decode_one(prompt)


def test_chat_default_method_is_best_of_n(server, tok, tiny_dir):
    r = server.client.chat.completions.create(model="tiny", messages=HELLO, seed=7)
    record = decode_locally(tiny_dir, "hello", method="best-of-n", n=2, max_new_tokens=16, seed=7)
    # same answer; the score agrees up to float32 summation order (the server runs on 1 thread, the test on 2)
    assert r.choices[0].message.content == record["response"]
    assert r.specalign["score"] == pytest.approx(record["score"], rel=1e-5)
    assert len(r.choices) == 1 and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    info = r.specalign
    assert info["method"] == "best-of-n" and info["num_candidates"] == 2 and "rounds" not in info
    assert info["seed"] == 7 and info["scores"] == [info["score"]]
    assert r.usage.prompt_tokens == len(chat_ids(tok, HELLO))
    assert 1 <= r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = server.client.chat.completions.create(model="tiny", messages=HELLO, seed=7)
    assert again.choices[0].message.content == r.choices[0].message.content  # a seed reproduces the answer
    system = [{"role": "system", "content": "be kind"}, *HELLO]
    r = server.client.chat.completions.create(model="tiny", messages=system, seed=7)
    assert r.usage.prompt_tokens == len(chat_ids(tok, system))  # every message goes through the chat template


def test_chat_spec_rejection_per_request(server, tiny_dir):
    r = server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, seed=1,
                                              extra_body={"method": "spec-rejection", "n": 8, "alpha": 0.5})
    info = r.specalign
    record = decode_locally(tiny_dir, "hello", method="spec-rejection", n=8, alpha="0.5", max_new_tokens=24, seed=1)
    assert r.choices[0].message.content == record["response"]
    decisions = lambda rounds: [(x["rows"], x["kept_ids"], x["decision_tokens"]) for x in rounds]  # noqa: E731
    assert decisions(info["rounds"]) == decisions(record["rounds"])
    assert info["method"] == "spec-rejection" and info["num_candidates"] == 8
    assert info["params"]["alpha"] == "0.5" and info["params"]["n"] == 8
    rounds = info["rounds"]
    assert rounds[0]["rows"] == 8 and rounds[0]["kept"] == 4  # alpha 0.5: half of the 8 rejected at once
    # n = 8 choices asked: the finished candidates, best first (rejected ones never finished)
    assert 1 <= len(r.choices) == min(8, info["finished_candidates"]) < 8
    assert info["scores"] == sorted(info["scores"], reverse=True) and info["scores"][0] == info["score"]
    assert r.usage.completion_tokens <= info["generated_tokens"]


def test_stream_tokens_as_sampled(server):
    kw = dict(model="tiny", messages=HELLO, seed=3, max_tokens=40, extra_body={"method": "sample"})
    full = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(text) == full.choices[0].message.content
    assert len(text) >= 10  # token by token, not one block at the end
    assert chunks[0].choices[0].delta.role == "assistant"
    last = [c for c in chunks if c.choices][-1]
    assert last.choices[0].finish_reason == full.choices[0].finish_reason
    assert last.specalign["method"] == "sample" and last.specalign["seed"] == 3
    assert chunks[-1].usage.total_tokens == full.usage.total_tokens

    # a stop string: the stream never shows its start, the answer ends before it
    answer = full.choices[0].message.content
    stop = answer[10:13]
    expected = answer[:answer.find(stop)]
    chunks = list(server.client.chat.completions.create(**kw, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c for c in chunks if c.choices][-1].choices[0].finish_reason == "stop"
    assert server.client.chat.completions.create(**kw, stop=stop).choices[0].message.content == expected


def test_stream_ranked_answer_in_chunks(server):
    kw = dict(model="tiny", messages=HELLO, seed=5, max_tokens=40)
    full = server.client.chat.completions.create(**kw)
    chunks = list(server.client.chat.completions.create(**kw, stream=True))
    text = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(text) == full.choices[0].message.content
    assert all(len(t) <= 16 for t in text) and len(text) == -(-len(full.choices[0].message.content) // 16)
    assert chunks[-1].specalign["method"] == "best-of-n" and chunks[-1].specalign["num_candidates"] == 2


def test_completions_endpoint(server, tok):
    kw = dict(model="tiny", prompt="hello", n=2, max_tokens=8, seed=2, extra_body={"method": "sample"})
    r = server.client.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1] and r.specalign["num_candidates"] == 2
    assert r.usage.prompt_tokens == len(tok("hello")["input_ids"])  # raw text: no chat template
    assert r.usage.completion_tokens == r.specalign["generated_tokens"]
    streamed = {0: "", 1: ""}
    for c in server.client.completions.create(**kw, stream=True):
        for choice in c.choices:
            streamed[choice.index] += choice.text
    assert streamed == {c.index: c.text for c in r.choices}  # both samples streamed, each under its index
    by_ids = server.client.completions.create(**{**kw, "prompt": tok("hello")["input_ids"]})
    assert [c.text for c in by_ids.choices] == [c.text for c in r.choices]
    with pytest.raises(openai.BadRequestError) as err:
        server.client.completions.create(model="tiny", prompt="a" * 600)
    assert err.value.param == "prompt" and "exceeds the model's context of 512" in err.value.message


@pytest.mark.parametrize("kw, status, param, message", [
    (dict(extra_body={"method": "spec-rejection", "alpha": 1.5}), 400, "alpha", "alpha must be in [0, 1), got 1.5"),
    (dict(extra_body={"scorer": "judge:nope"}), 400, "scorer", "unknown scorer 'judge:nope'"),
    (dict(messages=[]), 400, "messages", "at least 1 item"),
    (dict(max_tokens=0), 400, "max_tokens", "max-new-tokens must be >= 1, got 0"),
    (dict(model="nope"), 404, "model", "The model 'nope' does not exist"),
    (dict(extra_body={"method": "nope"}), 400, "method", "unknown method 'nope'"),
    (dict(extra_body={"method": "speculative"}), 400, "method", "the speculative generator needs --draft"),
    (dict(extra_body={"method": "spec-rejection", "decision": "x"}), 400, "decision", "decision must be tokens:K"),
    (dict(extra_body={"best_of": 1}, n=2), 400, "best_of", "best_of must be >= n (2), got 1"),
    (dict(n=300), 400, "n", "n must be <= 256"),
    (dict(temperature=-1), 400, "temperature", "temperature must be >= 0"),
    (dict(extra_body={"scorer": "python:os:getcwd"}), 400, "scorer", "--allow-python-scorers"),
    (dict(messages=[{"role": "user", "content": "  "}]), 400, "messages", "empty prompt"),
    (dict(extra_body={"scorer": "implicit"}), 400, None, "scorer 'implicit' needs an SSS generator"),  # found running
])
def test_bad_request_then_next_good_request(server, kw, status, param, message):
    invalid = health(server)["requests"]["invalid"]
    with pytest.raises(openai.APIStatusError) as err:
        server.client.chat.completions.create(**{"model": "tiny", "messages": HELLO, **kw})
    assert err.value.status_code == status
    body = err.value.body
    assert body["param"] == param and message in body["message"], body
    assert body["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices
    if status == 400:
        assert health(server)["requests"]["invalid"] == invalid + 1


def test_error_after_the_stream_started_is_an_error_event(server):
    """The implicit reward exists only under SSS: the sampling run fails at its first scoring, after the stream
    has started; the client gets an error event (the openai client raises it) and the server goes on."""
    stream = server.client.chat.completions.create(model="tiny", messages=HELLO, stream=True,
                                                   extra_body={"scorer": "implicit"})
    with pytest.raises(openai.APIError, match="needs an SSS generator"):
        list(stream)
    assert server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices


def test_malformed_json_is_400(server):
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert server.client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4).choices


def test_disconnect_cancels_the_work(server):
    """A client that goes away stops its work at the next step: the job counts as cancelled, not completed.
    Uncancelled, 256 candidates of up to 480 tokens take several seconds on the tiny model."""
    body = {"model": "tiny", "messages": HELLO, "n": 256, "max_tokens": 480, "seed": 0}
    before = wait_idle(server)["requests"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    after = wait_idle(server, timeout=30)["requests"]
    assert after["cancelled"] == before["cancelled"] + 1 and after["completed"] == before["completed"]

    body = {**body, "stream": True, "method": "sample"}  # 256 samples streamed token by token
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "chat.completion.chunk"
    after_stream = wait_idle(server, timeout=30)["requests"]
    assert after_stream["cancelled"] == after["cancelled"] + 1 and after_stream["completed"] == after["completed"]


def test_burst_of_64_answered_then_memory_back(server):
    """64 concurrent requests on a queue of 2: each is answered 200 or 429 with Retry-After (then retried after
    that many seconds until served); the server's RSS goes back to within 10% of its idle level."""
    idle = rss_kb(server.pid)
    body = {"model": "tiny", "messages": HELLO, "max_tokens": 16, "method": "sample"}
    first: list[int] = []
    batches: list[int] = []

    async def one(client: httpx.AsyncClient) -> None:
        for attempt in range(60):
            r = await client.post(f"{server.url}/v1/chat/completions", json=body)
            if attempt == 0:
                first.append(r.status_code)
            if r.status_code == 200:
                batches.append(r.json()["specalign"]["batch_size"])
                return
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            await asyncio.sleep(int(r.headers["Retry-After"]))
        raise AssertionError("never served")

    async def burst() -> None:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            await asyncio.wait_for(asyncio.gather(*(one(client) for _ in range(64))), timeout=150)

    rejected = health(server)["requests"]["rejected"]
    asyncio.run(burst())
    assert len(first) == 64 and set(first) <= {200, 429}
    assert first.count(200) >= 1 and first.count(429) >= 1
    assert len(batches) == 64 and max(batches) >= 2  # waiting plain-sampling requests were decoded together
    state = wait_idle(server)
    assert state["requests"]["rejected"] >= rejected + first.count(429)
    time.sleep(0.5)
    after = rss_kb(server.pid)
    assert after <= 1.10 * idle, f"RSS {after} kB after the burst vs {idle} kB idle"
    print(f"RSS idle {idle} kB, after the burst {after} kB ({after / idle - 1:+.1%})")


def test_visible_holds_back_a_possible_stop_string():
    from specalign.serve.worker import visible
    assert visible("abc\nUs", ("\nUser",)) == "abc"
    assert visible("abc\nUx", ("\nUser",)) == "abc\nUx"
    assert visible("ab\ufffd", ()) == "ab"


def test_cli_errors_before_loading_models(tiny_dir, capsys):
    assert main(["serve", "--port", "70000"]) == 2
    assert "error: port must be in [0, 65535], got 70000" in capsys.readouterr().err
    assert main(["serve", "--queue-size", "0"]) == 2
    assert "error: queue-size must be >= 1" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main(["serve", "--model", tiny_dir, "--port", str(port)]) == 2
        assert f"error: cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


@pytest.mark.slow
def test_smollm2_spec_rejection_server(tmp_path):
    """The documented set-up: SmolLM2 served with Speculative Rejection, called with the openai client; SIGTERM
    stops it cleanly."""
    from specalign.errors import SpecError
    from specalign.models.loading import resolve
    try:
        resolve("smollm2-135m-instruct")
    except SpecError as exc:
        pytest.skip(str(exc))
    yaml = ("model: smollm2-135m-instruct\nmethod: spec-rejection\nn: 8\nalpha: 0.5\ndecision: tokens:8\n"
            "scorer: judge:sentiment\nmax_new_tokens: 24\n")
    with launch(tmp_path, yaml, "smollm2-135m-instruct") as server:
        r = server.client.chat.completions.create(model=server.model, seed=0,
                                                  messages=[{"role": "user", "content": "Write a kind note."}])
        info = r.specalign
        assert info["method"] == "spec-rejection" and info["num_candidates"] == 8 and info["rounds"]
        assert info["rounds"][0]["rows"] == 8 and info["rounds"][0]["kept"] == 4
        assert r.choices[0].message.content.strip() and -1 <= info["score"] <= 1
        chunks = list(server.client.chat.completions.create(model=server.model, seed=0, max_tokens=12, stream=True,
                                                            messages=[{"role": "user", "content": "Hi!"}],
                                                            extra_body={"method": "sample"}))
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) >= 2
        server.proc.terminate()  # uvicorn shuts down, then exits by the signal it caught
        assert server.proc.wait(timeout=60) == -signal.SIGTERM
        assert "Application shutdown complete" in server.log.read_text()
