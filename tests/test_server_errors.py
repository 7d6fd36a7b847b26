"""Bad input against a real ``gpt2fast serve``: each case gets the right status and OpenAI's error body naming the
problem, and a good request still works right after it. Extreme but legal values reach the engine and get a 200.
Also: 503 + Retry-After when the queue is full, and a Host check (DNS rebinding) on the loopback address.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field

import httpx
import pytest

from tests.serverproc import TINY_MODEL, running

# Server and tests share two busy cores: one torch thread each (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")

KEY = "sk-test-errors"
MAX_BODY = 100_000
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
GOOD = {"model": TINY_MODEL, "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def server():
    # Two sequences run, none queue: the 503 test can fill the server with one n=2 stream.
    with running("serve", "--model", TINY_MODEL, "--api-key", KEY, "--max-num-seqs", "2", "--max-queue", "0",
                 "--max-body-bytes", str(MAX_BODY), "--cpu-threads", "1") as s:
        yield s


@dataclass
class Case:
    name: str
    status: int
    says: str  # must appear in the message (case-insensitive)
    param: str | None = None
    body: dict = field(default_factory=dict)  # merged into GOOD
    drop: tuple[str, ...] = ()  # removed from GOOD
    raw: bytes | None = None  # sent as is instead of a JSON body
    chunks: list[bytes] | None = None  # sent chunked (no Content-Length)
    headers: dict = field(default_factory=lambda: {**AUTH, **JSON})
    method: str = "POST"
    path: str = "/v1/completions"


LONG_PROMPT = "hello " * 1100  # 1100 tokens: over the 1024-token context
CASES = [
    # the key
    Case("missing_key", 401, "didn't provide an api key", headers=JSON),
    Case("wrong_key", 401, "incorrect api key", headers={"Authorization": "Bearer nope", **JSON}),
    Case("key_not_bearer", 401, "api key", headers={"Authorization": KEY, **JSON}),
    # the body as a whole
    Case("malformed_json", 400, "parse the json", raw=b'{"model": "x", "prompt": '),
    Case("json_not_an_object", 400, "must be a json object", raw=b'["model", "prompt"]'),
    Case("empty_body", 400, "empty", raw=b""),
    Case("nan_is_not_json", 400, "nan is not valid json", raw=b'{"model": "m", "temperature": NaN}'),
    Case("deeply_nested_json", 400, "parse the json", raw=b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
    Case("deeply_nested_lists", 400, "holds 50000 json lists", "prompt", raw=b"[" * 50_000 + b"]" * 50_000),
    Case("not_utf8", 400, "parse the json", raw=b'{"model": "\xff\xfe"}'),
    Case("wrong_content_type", 415, "application/json", raw=b'{"model": "x"}', headers={**AUTH, "Content-Type":
                                                                                        "text/plain"}),
    Case("body_too_large", 413, f"{MAX_BODY} bytes", raw=b"{" + b" " * MAX_BODY + b"}"),
    Case("chunked_body_too_large", 413, f"{MAX_BODY} bytes", chunks=[b"{" + b" " * 40_000] * 3 + [b"}"]),
    # fields
    Case("unknown_field", 400, "unrecognized request argument supplied: temprature", "temprature",
         body={"temprature": 0.5}),
    Case("missing_model", 400, "field required", "model", drop=("model",)),
    Case("unknown_model", 404, "does not exist", "model", body={"model": "gpt-4"}),
    Case("temperature_string", 400, "valid number", "temperature", body={"temperature": "hot"}),
    Case("temperature_negative", 400, "greater than or equal to 0", "temperature", body={"temperature": -0.5}),
    Case("temperature_too_high", 400, "less than or equal to 2", "temperature", body={"temperature": 2.5}),
    Case("top_p_zero", 400, "greater than 0", "top_p", body={"top_p": 0}),
    Case("top_p_above_one", 400, "less than or equal to 1", "top_p", body={"top_p": 1.5}),
    Case("n_zero", 400, "greater than or equal to 1", "n", body={"n": 0}),
    Case("n_huge", 400, "less than or equal to 128", "n", body={"n": 100_000}),
    Case("n_beyond_batch", 400, "max_num_seqs", "n", body={"n": 3}),
    Case("n_bool", 400, "valid integer", "n", body={"n": True}),
    Case("n_float", 400, "valid integer", "n", body={"n": 2.0}),
    Case("max_tokens_negative", 400, "greater than or equal to 0", "max_tokens", body={"max_tokens": -1}),
    Case("max_tokens_string", 400, "valid integer", "max_tokens", body={"max_tokens": "10"}),
    Case("max_tokens_huge", 400, "maximum context length is 1024", "max_tokens", body={"max_tokens": 10**9}),
    Case("logprobs_above_5", 400, "less than or equal to 5", "logprobs", body={"logprobs": 6}),
    Case("logprobs_bool", 400, "valid integer", "logprobs", body={"logprobs": True}),
    Case("stop_too_many", 400, "at most 4 stop", "stop", body={"stop": ["a", "b", "c", "d", "e"]}),
    Case("stop_empty", 400, "cannot be empty", "stop", body={"stop": ""}),
    Case("stop_number", 400, "valid string", "stop", body={"stop": 123}),
    Case("seed_negative", 400, "greater than or equal to 0", "seed", body={"seed": -1}),
    Case("seed_too_big", 400, "less than or equal to", "seed", body={"seed": 2**64}),
    Case("presence_penalty_out_of_range", 400, "less than or equal to 2", "presence_penalty",
         body={"presence_penalty": 3}),
    Case("frequency_penalty_out_of_range", 400, "greater than or equal to -2", "frequency_penalty",
         body={"frequency_penalty": -3}),
    Case("repetition_penalty_zero", 400, "greater than 0", "repetition_penalty", body={"repetition_penalty": 0}),
    Case("top_k_below_minus_one", 400, "greater than or equal to -1", "top_k", body={"top_k": -2}),
    Case("min_p_above_one", 400, "less than or equal to 1", "min_p", body={"min_p": 1.5}),
    Case("stream_string", 400, "valid boolean", "stream", body={"stream": "yes"}),
    Case("echo_string", 400, "valid boolean", "echo", body={"echo": "true"}),
    Case("stream_options_without_stream", 400, "only allowed when 'stream' is enabled", "stream_options",
         body={"stream_options": {"include_usage": True}}),
    Case("unknown_nested_field", 400, "unrecognized request argument supplied: stream_options.bogus",
         "stream_options.bogus", body={"stream": True, "stream_options": {"bogus": 1}}),
    # best_of (OpenAI's legacy meaning), bounded like n
    Case("best_of_below_n", 400, "best_of must be greater than or equal to n", "best_of", body={"best_of": 1, "n": 2}),
    Case("best_of_streamed", 400, "cannot be streamed", "best_of", body={"best_of": 2, "stream": True}),
    Case("best_of_beyond_batch", 400, "best_of=3 is more samples than run at once", "best_of", body={"best_of": 3}),
    Case("best_of_huge", 400, "less than or equal to 128", "best_of", body={"best_of": 129}),
    Case("best_of_times_prompts", 400, "2 prompts x best_of=2 is 4 sequences", "prompt",
         body={"prompt": ["a", "b"], "best_of": 2}),
    Case("best_of_zero", 400, "greater than or equal to 1", "best_of", body={"best_of": 0}),
    Case("best_of_bool", 400, "valid integer", "best_of", body={"best_of": True}),
    # logit_bias: token id strings -> [-100, 100], at most 300, inside the vocabulary
    Case("logit_bias_key_not_an_id", 400, "keys must be token ids", "logit_bias", body={"logit_bias": {"hi": 1}}),
    Case("logit_bias_negative_id", 400, "keys must be token ids", "logit_bias", body={"logit_bias": {"-1": 1}}),
    Case("logit_bias_above_100", 400, "must be in [-100, 100]", "logit_bias", body={"logit_bias": {"11": 100.5}}),
    Case("logit_bias_below_minus_100", 400, "must be in [-100, 100]", "logit_bias", body={"logit_bias": {"11": -101}}),
    Case("logit_bias_infinite", 400, "finite number", "logit_bias", raw=json.dumps(
        {**GOOD, "logit_bias": {"11": 1}}).replace('"11": 1', '"11": 1e999').encode()),
    Case("logit_bias_string_value", 400, "valid number", "logit_bias", body={"logit_bias": {"11": "5"}}),
    Case("logit_bias_not_an_object", 400, "valid dictionary", "logit_bias", body={"logit_bias": [11, 5]}),
    Case("logit_bias_outside_vocab", 400, "token id 50257 is outside", "logit_bias", body={"logit_bias": {"50257": 1}}),
    Case("logit_bias_too_many", 400, "at most 300", "logit_bias", body={"logit_bias": {str(i): 1 for i in range(301)}}),
    # vLLM's extensions
    Case("min_tokens_negative", 400, "greater than or equal to 0", "min_tokens", body={"min_tokens": -1}),
    Case("min_tokens_above_max_tokens", 400, "less than or equal to max_tokens (2)", "min_tokens",
         body={"min_tokens": 3}),
    Case("min_tokens_string", 400, "valid integer", "min_tokens", body={"min_tokens": "1"}),
    Case("include_stop_str_in_output_string", 400, "valid boolean", "include_stop_str_in_output",
         body={"include_stop_str_in_output": "yes"}),
    Case("skip_special_tokens_number", 400, "valid boolean", "skip_special_tokens", body={"skip_special_tokens": 0}),
    Case("spaces_between_special_tokens_string", 400, "valid boolean", "spaces_between_special_tokens",
         body={"spaces_between_special_tokens": "false"}),
    Case("prompt_logprobs_negative", 400, "greater than or equal to 0", "prompt_logprobs",
         body={"prompt_logprobs": -1}),
    Case("prompt_logprobs_above_20", 400, "less than or equal to 20", "prompt_logprobs", body={"prompt_logprobs": 21}),
    Case("prompt_logprobs_bool", 400, "valid integer", "prompt_logprobs", body={"prompt_logprobs": True}),
    Case("prompt_logprobs_streamed", 400, "not available when stream is true", "prompt_logprobs",
         body={"prompt_logprobs": 1, "stream": True}),
    Case("return_tokens_as_token_ids_string", 400, "valid boolean", "return_tokens_as_token_ids",
         body={"return_tokens_as_token_ids": "yes"}),
    Case("continuous_usage_stats_string", 400, "valid boolean", "stream_options",
         body={"stream": True, "stream_options": {"continuous_usage_stats": "yes"}}),
    Case("unknown_vllm_field", 400, "unrecognized request argument supplied: guided_regex", "guided_regex",
         body={"guided_regex": "a+"}),
    Case("suffix_unsupported", 400, "suffix", "suffix", body={"suffix": " the end"}),
    Case("stop_token_ids_negative", 400, ">= 0", "stop_token_ids", body={"stop_token_ids": [-5]}),
    # prompts
    Case("prompt_empty_list", 400, "empty list", "prompt", body={"prompt": []}),
    Case("prompt_empty_token_list", 400, "empty list of token ids", "prompt", body={"prompt": [[]]}),
    Case("prompt_mixed_types", 400, "must be a string", "prompt", body={"prompt": [1, "a"]}),
    Case("prompt_object", 400, "must be a string", "prompt", body={"prompt": {"text": "Hi"}}),
    Case("prompt_bool_ids", 400, "must be a string", "prompt", body={"prompt": [True, False]}),
    Case("token_id_past_vocab", 400, "token id 50257", "prompt", body={"prompt": [15496, 50257]}),
    Case("token_id_negative", 400, "token id -1", "prompt", body={"prompt": [[1], [-1]]}),
    Case("prompt_over_context", 400, "maximum context length is 1024", "prompt", body={"prompt": LONG_PROMPT}),
    Case("prompt_plus_max_tokens_over_context", 400, "1000 in your prompt; 100 for the completion", "max_tokens",
         body={"prompt": [11] * 1000, "max_tokens": 100}),
    Case("more_prompts_than_capacity", 400, "3 prompts", "prompt", body={"prompt": ["a", "b", "c"]}),
    Case("huge_prompt_list", 400, "15001 json lists: one request may send at most 2 prompts", "prompt",
         body={"prompt": [[1]] * 15_000}),
    # routes
    Case("unknown_route", 404, "invalid url (post /v1/nothing)", path="/v1/nothing"),
    Case("wrong_method", 405, "method not allowed", method="GET"),
    Case("unknown_model_card", 404, "does not exist", "model", method="GET", path="/v1/models/gpt-4"),
    Case("chat_completions", 400, "no chat template", path="/v1/chat/completions",
         body={"messages": [{"role": "user", "content": "Hi"}]}),
    # half a UTF-16 pair, escaped in valid JSON: no text, so nothing can tokenize, echo or UTF-8 encode it
    Case("lone_surrogate_prompt_echoed", 400, "lone utf-16 surrogate", body={"prompt": "\ud800", "echo": True}),
    Case("lone_surrogate_in_prompts", 400, "lone utf-16 surrogate", body={"prompt": ["ok", "a\udfffb"]}),
    Case("lone_surrogate_model", 400, "lone utf-16 surrogate", body={"model": "\ud800"}),
    Case("lone_surrogate_field_name", 400, "lone utf-16 surrogate", body={"\ud800": 1}),
    Case("lone_surrogate_stop", 400, "lone utf-16 surrogate", body={"stop": ["\udc00"]}),
    Case("reversed_surrogate_pair", 400, "lone utf-16 surrogate", body={"user": "\udc00\ud800"}),
    # JSON travels as UTF-8: json.loads would take UTF-16/32 (and the lone surrogates in them) as well
    *[Case(f"lone_surrogate_in_{enc.replace('-', '_')}_body", 400, "codec can't decode", raw=json.dumps(
        {**GOOD, "prompt": "x\ud800y", "echo": True}, ensure_ascii=False).encode(enc, "surrogatepass"))
      for enc in ("utf-16", "utf-16-le", "utf-32-le")],
    Case("raw_surrogate_bytes", 400, "codec can't decode", raw=json.dumps(GOOD).replace(
        '"Hi"', '"H\udfffi"').encode("utf-8", "surrogatepass")),
]


def send(server, case: Case) -> httpx.Response:
    body = {k: v for k, v in (GOOD | case.body).items() if k not in case.drop}
    if case.chunks is not None:
        content = iter(case.chunks)
    elif case.raw is not None:
        content = case.raw
    else:
        content = json.dumps(body).encode()  # ASCII, \uXXXX escapes: lone surrogates travel as JSON allows
    if case.method == "GET":
        return httpx.get(server.url + case.path, headers=case.headers, timeout=30)
    return httpx.request(case.method, server.url + case.path, content=content, headers=case.headers, timeout=30)


def good_request_works(server) -> None:
    r = httpx.post(server.url + "/v1/completions", json=GOOD, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_the_right_status_and_names_the_problem(server, case):
    r = send(server, case)
    assert r.status_code == case.status, r.text
    body = r.json()
    assert list(body) == ["error"] and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert error["type"] == "invalid_request_error"
    assert case.says.lower() in error["message"].lower(), error["message"]
    assert error["param"] == case.param
    good_request_works(server)


# Odd values for each field: the random requests below mix them, valid and not.
ODD_VALUES = {
    "prompt": ["Hi", "", None, [], [[]], [1, 2], [[1], [2]], ["a", "b"], [1, "a"], [50257], [-3], {"a": 1}, 7, True,
               "x" * 10, [[True]], [1.5], "\ud800", ["a", "\udc00"]],
    "max_tokens": [0, 1, 2, -1, None, "2", 2.0, 10**12, True],
    "temperature": [0, 0.5, 2, 2.01, -1, None, "0.5", float("inf"), [1], True],
    "top_p": [0, 0.5, 1, 1.01, None, "1", -0.1, 1e-46, 5e-324],
    "n": [1, 2, 3, 0, 129, None, True, 1.0, "2"],
    "logprobs": [0, 5, 6, -1, None, True, "1"],
    "echo": [True, False, None, 1, "yes"],
    "stream": [True, False, None, 0, "no"],
    "stop": ["\n", ["a", "b"], [], "", [""], 5, ["a"] * 5, None, [None]],
    "seed": [0, 1, -1, 2**64, None, "7", 1.5],
    "presence_penalty": [0, 2, -2, 2.5, None, "0"],
    "top_k": [0, -1, 5, -2, 1.5, None, 2**31, 10**30],
    "min_p": [0, 0.5, 1, 2, None, 1e-46],
    "model": [TINY_MODEL, "gpt-4", "\ud800"],
    "user": ["u", "\ud800"],
    "repetition_penalty": [1, 1.2, 0, -1, None],
    "stop_token_ids": [[1], [], [-1], ["a"], None, 3],
    "best_of": [1, 2, 3, 0, 129, None, True, "2"],
    "logit_bias": [{}, {"11": 5}, {"50256": -100}, {"x": 1}, {"11": 101}, {"99999": 1}, [1], None, {"11": None}],
    "min_tokens": [0, 1, 5, -1, None, "1", 1.5],
    "prompt_logprobs": [0, 3, 20, 21, -1, None, True],
    "include_stop_str_in_output": [True, False, None, 1],
    "skip_special_tokens": [True, False, None, "no"],
    "spaces_between_special_tokens": [True, False, None, 0],
    "return_tokens_as_token_ids": [True, False, None, "x"],
    "stream_options": [None, {"include_usage": True}, {"continuous_usage_stats": True}, {"continuous_usage_stats": 1},
                       {"include_usage": False, "continuous_usage_stats": True}],
    "bogus_field": [1],
    "\ud800": [1],
}


def test_random_mixes_of_odd_values_never_give_a_server_error(server):
    rng = random.Random(8)
    statuses = set()
    for _ in range(80):
        body = {"model": TINY_MODEL, "max_tokens": 1, "temperature": 1.0}  # sampled: top_k/top_p reach the sampler
        for name in rng.sample(sorted(ODD_VALUES), 3):
            body[name] = rng.choice(ODD_VALUES[name])
        raw = json.dumps(body).replace("Infinity", "1e999").encode()  # 1e999 parses as inf, not as a constant
        r = httpx.post(server.url + "/v1/completions", content=raw, headers={**AUTH, **JSON}, timeout=30)
        statuses.add(r.status_code)
        assert r.status_code in (200, 400, 404), (body, r.text)
        if r.status_code == 404:
            assert r.json()["error"]["param"] == "model" and body["model"] != TINY_MODEL, (body, r.text)
        elif r.status_code == 400:
            error = r.json()["error"]
            named = error["param"] in body or (error["code"] == "invalid_json" and "surrogate" in error["message"])
            assert named and error["message"], (body, error)
        elif not body.get("stream"):
            assert r.json()["object"] == "text_completion", body
        else:
            assert r.text.endswith("data: [DONE]\n\n"), body
    assert {200, 400} <= statuses, "the mix has both valid and invalid requests"
    good_request_works(server)


def test_the_battery_covers_at_least_30_cases():
    """A guard on the list above (not a server test): it keeps its size and its names stay unique."""
    assert len(CASES) >= 30 and len({c.name for c in CASES}) == len(CASES)


def complete(server, **fields) -> httpx.Response:
    body = json.dumps(GOOD | {"prompt": "Odd but legal", "max_tokens": 4} | fields).encode()
    return httpx.post(server.url + "/v1/completions", content=body, headers={**AUTH, **JSON}, timeout=30)


# (fields, the plain fields that must give the same tokens): a top_k of the vocabulary or more is off (even past
# int32), a top_p below fp32's smallest subnormal keeps the top token (greedy), so does a tiny temperature.
LEGAL_EXTREMES = [
    ({"temperature": 0.9, "seed": 4, "top_k": 2**31}, {"temperature": 0.9, "seed": 4, "top_k": 0}),
    ({"temperature": 0.9, "seed": 4, "top_k": 10**30}, {"temperature": 0.9, "seed": 4}),
    ({"temperature": 0.9, "seed": 4, "top_k": 50257}, {"temperature": 0.9, "seed": 4}),
    ({"temperature": 0.9, "seed": 4, "top_p": 1e-46}, {"temperature": 0}),
    ({"temperature": 1.5, "seed": 4, "top_p": 5e-324, "presence_penalty": 1.0}, {"temperature": 0,
                                                                                   "presence_penalty": 1.0}),
    ({"temperature": 1e-46, "seed": 4}, {"temperature": 0}),
    ({"temperature": 0.9, "seed": 4, "min_p": 1e-46}, {"temperature": 0.9, "seed": 4}),
    # vLLM's defaults spelled out, an empty logit_bias, a zero bias, best_of equal to n: plain sampling
    ({"temperature": 0.9, "seed": 4, "min_tokens": 0, "skip_special_tokens": True, "include_stop_str_in_output": False,
      "spaces_between_special_tokens": False, "logit_bias": {}, "best_of": 1}, {"temperature": 0.9, "seed": 4}),
    ({"temperature": 0.9, "seed": 4, "logit_bias": {"50256": 0, "11": 0.0}, "best_of": 2, "n": 2},
     {"temperature": 0.9, "seed": 4, "n": 2}),
]


@pytest.mark.parametrize("fields,plain", LEGAL_EXTREMES, ids=[json.dumps(f) for f, _ in LEGAL_EXTREMES])
def test_extreme_but_legal_values_reach_the_engine_and_answer_200(server, fields, plain):
    got, want = complete(server, **fields), complete(server, **plain)
    assert got.status_code == want.status_code == 200, got.text
    assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
    assert got.json()["usage"] == want.json()["usage"]
    good_request_works(server)


def test_a_foreign_host_header_is_refused_on_loopback(server):
    """Listening on 127.0.0.1: a page on another origin that rebinds its name to 127.0.0.1 sends its own Host."""
    port = server.url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}"):
        r = httpx.post(server.url + "/v1/completions", json=GOOD, headers={**AUTH, "Host": host}, timeout=30)
        assert r.status_code == 400 and "invalid host" in r.text.lower(), (host, r.text)
        assert httpx.get(server.url + "/health", headers={"Host": host}, timeout=10).status_code == 400
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        r = httpx.post(server.url + "/v1/completions", json=GOOD, headers={**AUTH, "Host": host}, timeout=30)
        assert r.status_code == 200, (host, r.text)


def test_a_full_queue_answers_503_with_retry_after_then_recovers(server):
    hold = GOOD | {"prompt": "Hold", "max_tokens": 1000, "n": 2, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server.url + "/v1/completions", json=hold, headers=AUTH) as holder:
            assert holder.status_code == 200
            lines = holder.iter_lines()  # kept: a dropped iterator closes the connection
            next(lines)  # both of the server's sequences are now taken
            r = c.post(server.url + "/v1/completions", json=GOOD, headers=AUTH)
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == "server_error" and r.json()["error"]["code"] == "overloaded"
            assert "busy" in r.json()["error"]["message"]
    deadline = time.monotonic() + 10  # hanging up gave the sequences back
    while httpx.get(server.url + "/metrics", timeout=10).text.count("gpt2fast_num_sequences_admitted 0.0") == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    good_request_works(server)


def test_health_and_metrics_need_no_key_and_the_server_still_serves(server):
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    text = httpx.get(server.url + "/metrics", timeout=10).text
    assert 'gpt2fast_requests_total{status="400"}' in text and "gpt2fast_requests_total{status=\"500\"}" not in text
    good_request_works(server)


class _CountingTokenizer:
    """A tokenizer that counts what is asked of it (a huge prompt list must be refused before any of it)."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def encode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.encode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        self.calls += 1
        return self.inner.decode(*args, **kwargs)


@pytest.mark.parametrize("prompt", [[[1]] * 200_000, ["a"] * 200_000, [[1], "a"] * 100_000],
                         ids=["token_lists", "strings", "mixed"])
def test_a_huge_prompt_list_is_refused_by_its_count_before_any_prompt_is_read(prompt):
    from gpt2fast.server.protocol import ApiError, ModelLimits, split_prompts
    from gpt2fast.tokenizer import load_tokenizer

    tokenizer = _CountingTokenizer(load_tokenizer())
    limits = ModelLimits(tokenizer, 50257, 1024, 50256, max_seqs=320)
    with pytest.raises(ApiError) as e:
        split_prompts(prompt, limits)
    assert e.value.status == 400 and e.value.param == "prompt"
    assert e.value.message == "200000 prompts: one request may send at most 320 prompts (prompts x n)"
    assert tokenizer.calls == 0
    assert len(split_prompts([[1]] * 320, limits)) == 320 and tokenizer.calls == 320  # the limit itself is fine


def _count_lists(value) -> int:
    if isinstance(value, list):
        return 1 + sum(_count_lists(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_lists(v) for v in value.values())
    return 0


def test_json_lists_are_counted_on_the_raw_bytes_as_the_parser_sees_them():
    """``check_json_lists`` counts ``[`` outside strings: against json.loads on random bodies whose strings hold
    brackets, quotes and backslashes (escaped as JSON escapes them, ASCII or not)."""
    from gpt2fast.server.protocol import OTHER_LISTS, ApiError, check_json_lists, count_json_lists

    rng = random.Random(13)
    alphabet = ['[', ']', '"', '\\', 'a', ' ', '\u00e9', '\\u', '[[', '\n']

    def text() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))

    def value(depth: int):
        roll = rng.random()
        if depth < 3 and roll < 0.4:
            return [value(depth + 1) for _ in range(rng.randint(0, 5))]
        if depth < 3 and roll < 0.5:
            return {text(): value(depth + 1) for _ in range(rng.randint(0, 3))}
        return text() if roll < 0.8 else rng.randint(0, 50256)

    for trial in range(300):
        data = {"prompt": [value(1) for _ in range(rng.randint(0, 40))], "stop": [text() for _ in range(3)]}
        body = json.dumps(data, ensure_ascii=trial % 2 == 0).encode()
        lists = _count_lists(json.loads(body))
        assert count_json_lists(body) == lists, body
        check_json_lists(body, max(1, lists - OTHER_LISTS))  # at the limit: fine
        if lists > OTHER_LISTS + 1:
            with pytest.raises(ApiError, match=f"holds {lists} JSON lists"):
                check_json_lists(body, lists - OTHER_LISTS - 1)
    big = json.dumps({"model": "m", "prompt": [[1]] * 200_000}).encode()
    start = time.perf_counter()
    with pytest.raises(ApiError, match="holds 200001 JSON lists: one request may send at most 320 prompts"):
        check_json_lists(big, 320)
    parse_start = time.perf_counter()
    json.loads(big)
    assert parse_start - start < (time.perf_counter() - parse_start) / 3  # refused well before one parse's time
