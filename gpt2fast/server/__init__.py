"""``gpt2fast serve``: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn + prometheus_client).

Endpoints: ``POST /v1/completions`` (JSON or server-sent events), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text). ``POST /v1/chat/completions`` answers 400:
GPT-2 is a base model with no chat template.

Design (what was decided, and why):

- **One engine thread** (``loop.EngineLoop``) owns the ``Engine``, which is not thread-safe. It
  drains a ``queue.SimpleQueue`` inbox (add / abort / score / close / stop) between steps, steps
  while anything is unfinished, and otherwise blocks on the inbox. Every connection's requests
  join the same continuous batch. Results go back to the asyncio loop in one
  ``call_soon_threadsafe`` per iteration. Metrics gauges (running/waiting sequences, KV blocks
  used/free) are published by that thread after each iteration, and whenever the engine falls
  idle it runs ``Scheduler.check()`` (the block pool's invariants against every live table) and
  publishes the result as ``gpt2fast_kv_pool_check_ok``.
- **Request mapping**: an HTTP request with ``k`` prompts and ``n`` samples is ``k`` engine
  requests, each with ``SamplingParams(n=n)`` (the engine forks the samples after one shared
  prefill). Choice ``i * n + j`` is sample ``j`` of prompt ``i``, as OpenAI orders them. The
  engine's RNG is keyed by ``(seed, sample index, step)``, never the request id, so a seeded
  request returns what ``LLM.generate(prompt, SamplingParams(..same..))`` returns offline.
- **Outputs are cumulative**, so each request keeps only the newest one per prompt (a mailbox,
  not a queue): a slow reader skips ahead instead of piling up memory, and SSE chunks carry
  the text and tokens added since the last chunk it sent.
- **Disconnects**: a streaming response always closes its job in a ``finally`` (done, client
  gone, or cancelled), which aborts its engine requests and frees their blocks at once; a
  non-streaming request watches for ``http.disconnect`` while it waits and aborts likewise.
- **Admission**: at most ``max_num_seqs + max_queue`` sequences (prompts x n) are in flight;
  beyond that a request gets 503 with ``Retry-After: 1`` (``max_queue`` is the queue behind the
  running batch). One request may never ask for more than that (400).
- **Validation** is a strict pydantic model (``extra="forbid"``: unknown fields get OpenAI's
  "Unrecognized request argument supplied: NAME"; ``"1"`` is no number and ``true`` no integer).
  Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: 400 bad
  parameters (``param`` names the field), 401 missing/wrong key (when ``--api-key`` is set;
  ``/health`` and ``/metrics`` stay open), 404 unknown route or model, 405, 413 bodies over
  ``--max-body-bytes`` (Content-Length checked before reading, chunked bodies counted), 415 a
  Content-Type other than JSON, 408 a body slower than ``--body-timeout``, 503 busy or shutting
  down (or ``engine_stopped``: the engine thread died, so nothing would ever answer; ``/health``
  says 503 too). Bad input is never a 500: a JSON string holding half a UTF-16 surrogate pair
  (``"\\ud800"``) is a 400 at parse time, and every JSON body is written as ASCII, so
  no text can break the response encoder.
- **Connections** (``gpt2fast.http_limits``, shared with ``explore``): at most ``--max-connections``
  (kept below the file-descriptor limit, which is raised to the hard limit at start); at the cap a
  new connection closes the one waiting longest for a request, else the upload stalled longest
  (408), or gets 503 when all are busy answering;
  header, body and keep-alive timeouts close stalled sockets. A body still arriving at SIGTERM is
  answered 503. A JSON body is refused before it is parsed when it holds more lists than the
  request may send prompts (``check_json_lists``), and a prompt list by its length before any prompt.
- **Host check**: listening on a loopback address, the app answers only ``Host: 127.0.0.1``,
  ``localhost`` or ``[::1]`` (any port); any other Host gets 400, so a web page whose name
  rebinds to 127.0.0.1 cannot use a server that has no ``--api-key`` (DNS rebinding).
- **OpenAI's semantics kept**: ``max_tokens`` defaults to 16; a prompt plus ``max_tokens`` over
  the context is a 400 ("This model's maximum context length is ...") rather than the engine's
  silent clamp; ``n`` <= 128 and <= ``max_num_seqs``; ``logprobs`` 0..5 in the completions
  format (tokens, token_logprobs, top_logprobs with up to logprobs+1 entries, text_offset; a
  token that is part of a UTF-8 character reads ``bytes:\\xNN``); ``echo`` prepends the prompt,
  and with ``logprobs`` its logprobs too (one ``Engine.logits`` pass on the engine thread; the
  first token's is null); ``max_tokens=0`` with ``echo`` scores a prompt without generating;
  ``logit_bias`` (token id string -> [-100, 100], at most 300, added to the raw logits);
  ``best_of`` (<= 128 and ``max_num_seqs``, >= ``n``): that many samples run, the ``n`` with the
  highest cumulative logprob come back, ``usage`` counts them all, and it cannot be streamed;
  ``suffix`` is 400 (unsupported).
- **vLLM's extras**, by vLLM's names and meanings, for tools built for vLLM servers: ``top_k``,
  ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``,
  ``include_stop_str_in_output``, ``skip_special_tokens``, ``spaces_between_special_tokens``
  (accepted; nothing to do for a byte-level BPE), ``return_tokens_as_token_ids`` (logprobs tokens
  as ``token_id:N``), ``prompt_logprobs`` (per choice, per prompt token ``{id: {logprob, rank,
  decoded_token}}``, the first ``null``; from the same one-pass scoring as ``echo``; not with
  ``stream``), ``stream_options.continuous_usage_stats`` (each chunk carries its choice's usage so
  far). Any other field stays a 400.
- **Streaming**: ``text_completion`` chunks, one choice per chunk, the last one of a choice with
  its ``finish_reason``; ``usage`` in a final chunk only with ``stream_options.include_usage``
  (and in every chunk with ``continuous_usage_stats``); then ``data: [DONE]``. An engine failure
  mid-stream is sent as ``data: {"error": ...}``.
- **Shutdown** (SIGINT/SIGTERM): uvicorn is run as a ``uvicorn.Server`` whose signal handler
  first marks the server closing (new requests: 503) and tells the engine thread to abort
  everything in flight; open streams then end with a ``finish_reason: "abort"`` chunk and
  ``[DONE]`` (unfinished non-streaming requests get 503), uvicorn's graceful shutdown finds no
  open connection left, the engine thread stops, and the process exits 0 (uvicorn would
  otherwise re-raise the signal).

Example:
    gpt2fast serve --model gpt2 --port 8000 --api-key sk-local
    curl http://127.0.0.1:8000/v1/completions -H "Authorization: Bearer sk-local" \\
        -H "Content-Type: application/json" -d '{"model": "gpt2", "prompt": "Hello", "max_tokens": 8}'
"""

from gpt2fast.server.app import make_app
from gpt2fast.server.loop import EngineLoop
from gpt2fast.server.serve import main

__all__ = ["main", "make_app", "EngineLoop"]
