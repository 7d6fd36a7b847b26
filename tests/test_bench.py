"""``gpt2fast bench`` on a tiny random model: the JSON schema, every number finite and positive, the reports;
the ct2 provider end to end, the ort worker's protocol (against a stub Python), the peak-RSS child, --threads
and the --quantization axis."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from gpt2fast import bench

TINY = 'random:{"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128}'
META_KEYS = {"model", "device", "device_name", "machine", "cpu_count", "threads", "load_avg_1m", "python", "torch",
             "transformers", "triton", "gpt2fast", "config", "dtypes", "bandwidth_gbs", "quick", "peak_mem_kind",
             "tolerances", "skipped", "wall_s", "quantization", "engines"}
DECODE_KEYS = {"provider", "backend", "dtype", "batch", "prompt_lens", "context", "new_tokens", "ttft_ms",
               "decode_ms", "tok_s", "spread_pct", "floor_ms", "achieved_gbs", "pct_of_floor", "peak_mem_mb",
               "hf_ratio"}
CONTEXT_KEYS = {"provider", "backend", "dtype", "batch", "context", "new_tokens", "decode_ms", "tok_s", "spread_pct",
                "floor_ms", "achieved_gbs", "pct_of_floor"}
OVERHEAD_KEYS = {"provider", "backend", "dtype", "batch", "n_layer", "step_us", "forward_us", "overhead_us", "hf_ratio"}
PREFILL_KEYS = {"provider", "backend", "dtype", "prompt_len", "prefill_ms", "tok_s", "spread_pct", "peak_mem_mb"}
ACCURACY_KEYS = {"provider", "backend", "dtype", "text_tokens", "greedy_tokens", "max_abs_logit_err",
                 "max_abs_logit_diff_hf", "ppl", "ref_ppl", "ppl_rel_diff", "agree_until_divergence", "agree_total",
                 "flags"}
RSS_KEYS = {"provider", "backend", "dtype", "batch", "new_tokens", "peak_rss_mb"}
RATIO_KEYS = {"provider", "batch", "decode_ms", "hf_ratio"}
STRINGS = {"provider", "backend", "dtype"}


REAL_INTERLEAVED = bench.interleaved  # before steady_timings replaces it


def test_interleaved_times_every_job_round_by_round(monkeypatch):
    """The real bench.interleaved: every job once per round in bench.rounds' order, the pause (SETTLE_S) before
    each, and each job's seconds per round (positive; what they measure is bench.timings')."""
    import torch

    order, pauses = [], []
    monkeypatch.setattr(bench.time, "sleep", pauses.append)
    monkeypatch.setattr(bench, "SETTLE_S", 0.5)
    seconds = REAL_INTERLEAVED([lambda i=i: order.append(i) for i in range(3)], 4, torch.device("cpu"))
    assert order == list(bench.rounds(3, 4)) and pauses == [0.5] * 12
    assert [len(s) for s in seconds] == [4, 4, 4] and all(t > 0 for s in seconds for t in s)


def steady_interleaved(jobs, repeats, device):
    """``bench.interleaved`` with made-up seconds: every job still runs, in bench's round order, but job ``i`` of
    the call takes ``(i + 1)`` ms, a little more each round (so spreads are not 0), and a decode row's 1 + n token
    run always outlasts its 1 token run. The tiny models here step in about a millisecond, which the other xdist
    worker on a 2-core machine can swamp: CI measured negative decode steps, which bench rightly refuses."""
    seconds: list[list[float]] = [[] for _ in jobs]
    for i in bench.rounds(len(jobs), repeats):
        jobs[i]()
        seconds[i].append(1e-3 * (i + 1) * (1 + 0.01 * len(seconds[i])))
    return seconds


@pytest.fixture(scope="module", autouse=True)
def steady_timings():
    """These tests check what bench does with its timings, not the timings: steady_interleaved, no pause before
    each timed job (bench.SETTLE_S, for real measurements)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(bench, "SETTLE_S", 0.0)
        patch.setattr(bench, "interleaved", steady_interleaved)
        yield


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench")
    status = bench.main(["--model", TINY, "--backends", "torch", "--dtypes", "float32", "bfloat16",
                         "--batch-sizes", "1", "3", "--prompt-lens", "7", "200", "--contexts", "5", "60",
                         "--decode-tokens", "16", "--repeats", "3", "--greedy-tokens", "12", "--ppl-tokens", "50",
                         "--baselines", "hf", "--threads", "1", "--out", str(out)])
    assert status == 0
    with open(out / "bench.json") as f:
        return json.load(f), (out / "bench.md").read_text()


def test_a_backend_that_cannot_run_is_skipped_with_its_reason(monkeypatch):
    real_llm = bench.LLM

    def llm(model: str, backend: str, **kwargs):
        if backend == "triton":
            raise ValueError("no GPU here")
        return real_llm(model, backend=backend, **kwargs)

    monkeypatch.setattr(bench, "LLM", llm)
    args = bench.resolve_args(bench.build_parser().parse_args(["--model", TINY, "--backends", "torch", "triton"]))
    skipped: list[str] = []
    assert [p.name for p in bench.load_providers(args, skipped)] == ["gpt2fast[torch]/float32"]
    assert skipped == ["backend triton / auto: no GPU here"]


def numbers(value, key: str = ""):
    """Every (key, number) inside ``value``; bools are flags, not numbers."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from numbers(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v, key)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield key, value


def test_json_has_exactly_the_documented_keys(result):
    data, _ = result
    assert set(data) == {"meta", "decode", "context", "prefill", "overhead", "launches", "accuracy", "rss", "ratios"}
    assert set(data["meta"]) == META_KEYS
    assert data["meta"]["quantization"] == ["none"] and data["meta"]["engines"] == {} and data["meta"]["threads"] == 1
    sections = [("decode", DECODE_KEYS), ("context", CONTEXT_KEYS), ("prefill", PREFILL_KEYS),
                ("overhead", OVERHEAD_KEYS), ("accuracy", ACCURACY_KEYS), ("rss", RSS_KEYS), ("ratios", RATIO_KEYS)]
    for section, keys in sections:
        assert data[section], section
        for row in data[section]:
            expected = keys - {"hf_ratio"} if row.get("overhead_us") == 0 else keys  # no ratio to a zero
            assert set(row) == expected, (section, set(row) ^ expected)
            assert all(isinstance(row[k], str) for k in STRINGS & keys)
    providers = ("gpt2fast[torch]/float32", "gpt2fast[torch]/bfloat16", "hf")
    assert {(r["provider"], r["batch"]) for r in data["decode"]} == {(p, b) for p in providers for b in (1, 3)}
    assert [r["provider"] for r in data["prefill"]] == list(providers)
    assert [r["prompt_len"] for r in data["prefill"]] == [7, 7, 7]  # 200 is beyond the context: skipped, said so
    assert [r["provider"] for r in data["accuracy"]] == list(providers[:2])
    assert any("200" in note for note in data["meta"]["skipped"])
    # Contexts are capped so 16 decoded tokens still fit in 128 positions: 60 -> 60, and batch 1 throughout.
    assert [(r["provider"], r["batch"]) for r in data["context"]] == [(p, 1) for p in providers for _ in (5, 60)]
    assert [round(r["context"] - r["new_tokens"] / 2) for r in data["context"]] == [5, 60] * 3
    assert {(r["provider"], r["batch"], r["n_layer"]) for r in data["overhead"]} == {
        (p, b, 12) for p in providers for b in (1, 3)}
    assert [r["provider"] for r in data["rss"]] == list(providers)
    assert [(r["provider"], r["batch"]) for r in data["ratios"]] == [(p, b) for p in providers for b in (1, 3)]
    # No kernels on a CPU torch backend: no launch rows, and the report says why.
    assert data["launches"] == [] and sum("launch count" in note for note in data["meta"]["skipped"]) == 2


def test_every_number_is_finite_and_positive_errors_may_be_zero(result):
    data, _ = result
    found = list(numbers(data))
    assert len(found) > 50
    for key, value in found:
        assert math.isfinite(value), key
        if key in bench.FRACTIONS:
            assert 0 <= value <= 1, (key, value)
        elif key in bench.MAY_BE_ZERO:
            assert value >= 0, (key, value)
        else:
            assert value > 0, (key, value)


def test_torch_fp32_is_within_rounding_of_the_reference_and_bf16_shows_its_error_within_tolerance(result):
    fp32, bf16 = result[0]["accuracy"]
    assert fp32["max_abs_logit_err"] < 1e-4 and fp32["ppl_rel_diff"] < 1e-5 and fp32["agree_total"] == 1
    assert fp32["max_abs_logit_diff_hf"] < 1e-4 and fp32["flags"] == []
    assert 1000 < fp32["ppl"] < 10 * 50257  # random weights: about the vocabulary size
    assert 0 < bf16["max_abs_logit_err"] < bench.TOLERANCES["bfloat16"].logits_rel
    assert bf16["ref_ppl"] == fp32["ref_ppl"]
    assert bf16["flags"] == []


def test_floor_columns_follow_from_bytes_and_bandwidth(result):
    data, _ = result
    for row in data["decode"]:
        assert row["pct_of_floor"] == pytest.approx(100 * row["floor_ms"] / row["decode_ms"])
        assert row["achieved_gbs"] == pytest.approx(data["meta"]["bandwidth_gbs"] * row["pct_of_floor"] / 100)
        assert row["tok_s"] == pytest.approx(row["batch"] * 1e3 / row["decode_ms"])
    assert data["decode"][1]["prompt_lens"] == [16, 23, 30]  # batch 3 mixes prompt lengths
    fp32, bf16 = data["decode"][0], data["decode"][2]
    assert bf16["floor_ms"] < 0.6 * fp32["floor_ms"]  # half the bytes per weight


def test_ratios_to_hf_and_overhead_follow_from_the_rows(result):
    data, _ = result
    hf = {r["batch"]: r for r in data["decode"] if r["provider"] == "hf"}
    for row in data["decode"]:
        assert row["hf_ratio"] == pytest.approx(hf[row["batch"]]["decode_ms"] / row["decode_ms"])
    hf = {r["batch"]: r for r in data["overhead"] if r["provider"] == "hf"}
    for row in data["overhead"]:
        assert row["overhead_us"] == pytest.approx(max(row["step_us"] - row["forward_us"], 0))
        assert row["forward_us"] < row["step_us"]
        if row["overhead_us"] > 0:
            assert row["hf_ratio"] == pytest.approx(hf[row["batch"]]["overhead_us"] / row["overhead_us"])


def test_decode_rows_interleave_the_providers_round_by_round():
    llm = bench.LLM(TINY)
    calls: list[tuple[str, int]] = []

    def provider(name: str) -> bench.Provider:
        def generate(prompts: list[list[int]], n: int) -> None:
            calls.append((name, n))

        return bench.Provider(name, "x", "float32", generate, llm)

    a, b = provider("a"), provider("b")
    rows = bench.decode_rows([a, b], [[1, 2, 3]], 4, 3, bandwidth=1e9)
    warm, timed = calls[:2], calls[2:]
    assert warm == [("a", 5), ("b", 5)]  # the warm-up of each, at the timed length
    jobs = [("a", 1), ("a", 5), ("b", 1), ("b", 5)]
    assert timed == [jobs[i] for i in bench.rounds(4, 3)]
    assert [timed[4 * r][0] for r in range(3)] != ["a"] * 3  # rounds do not all start with the same provider
    assert [r["provider"] for r in rows] == ["a", "b"] and all(r["batch"] == 1 for r in rows)
    grouped = bench.by_provider([dict(provider="b", batch=1), dict(provider="a", batch=8), dict(provider="a", batch=1)],
                                [a, b])
    assert [(r["provider"], r["batch"]) for r in grouped] == [("a", 8), ("a", 1), ("b", 1)]


def test_launch_rows_hold_the_count_and_the_target(monkeypatch):
    import gpt2fast.launches

    monkeypatch.setattr(gpt2fast.launches, "decode_launches", lambda backend, device: (13, 4))
    llm = bench.LLM(TINY)
    row = bench.launch_row(bench.Provider("x", "triton", "float32", lambda prompts, n: None, llm), [])
    assert row == dict(provider="x", backend="triton", per_layer=13, fixed=4, per_step=30, target_per_step=13)


def test_markdown_report_names_every_provider_and_section(result):
    data, markdown = result
    for provider in {r["provider"] for section in ("decode", "prefill", "accuracy") for r in data[section]}:
        assert provider in markdown
    for title in ("## Acceptance ratios", "## Decode", "## Decode time vs context", "## Prefill", "## Runtime overhead",
                  "## Accuracy", "## Peak RSS", "% of floor", "max|err| vs fp32", "hf / this", "hf / this b=3"):
        assert title in markdown


def test_cli_help_and_bad_arguments():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt2fast", "bench", *args], capture_output=True, text=True,
                              timeout=60)

    shown = cli("--help")
    assert shown.returncode == 0 and "--quick" in shown.stdout and "--backends" in shown.stdout
    for flag in ("--quantization", "--ort-python", "--threads", "--no-rss"):
        assert flag in shown.stdout
    assert cli("--quantization", "int4").returncode == 2
    bad = cli("--batch-sizes", "0")
    assert bad.returncode == 2 and "--batch-sizes must be positive" in bad.stderr
    assert "--threads must be a positive integer" in cli("--threads", "0").stderr
    unknown = cli("--backends", "foo")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


# A plain install (`pip install -e .`) has no transformers: this process cannot import it.
WITHOUT_TRANSFORMERS = ("import sys; sys.modules['transformers'] = None; from gpt2fast.bench import main; "
                        "raise SystemExit(main(sys.argv[1:]))")
QUICKEST = ["--model", 'random:{"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}', "--backends", "torch",
            "--batch-sizes", "1", "--prompt-lens", "5", "--contexts", "5", "--decode-tokens", "8", "--repeats", "2",
            "--greedy-tokens", "4", "--ppl-tokens", "20", "--threads", "1"]


def bench_without_transformers(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_TRANSFORMERS, *args], capture_output=True, text=True,
                          timeout=300)


def test_without_transformers_bench_runs_and_says_how_to_add_hf(tmp_path):
    result = bench_without_transformers("--quick", *QUICKEST, "--out", str(tmp_path))  # --quick: hf by default
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert 'transformers is not installed; pip install -e ".[bench]" adds them' in result.stdout
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["transformers"] == "not installed"
    assert {r["provider"] for r in data["decode"]} == {"gpt2fast[torch]/float32"}  # no hf row
    (accuracy,) = data["accuracy"]
    assert set(accuracy) == ACCURACY_KEYS - {"max_abs_logit_diff_hf"}
    assert accuracy["max_abs_logit_err"] < 1e-4 and accuracy["agree_total"] == 1 and accuracy["flags"] == []


def test_without_transformers_asking_for_hf_exits_2_with_one_line(tmp_path):
    result = bench_without_transformers(*QUICKEST, "--baselines", "hf-static", "--out", str(tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == ['gpt2fast bench: error: --baselines hf-static needs transformers, which is '
                                          'not installed: pip install -e ".[bench]"']
    assert not (tmp_path / "bench.json").exists()


def test_a_bad_device_names_the_flag(capsys):
    assert bench.main(["--model", TINY, "--device", "tpu"]) == 2
    assert capsys.readouterr().err == "gpt2fast bench: error: unknown --device 'tpu'; use 'auto', 'cpu' or 'cuda'\n"


# ---- the engines users pick on a CPU: CTranslate2 and ONNX Runtime -------------------------------------


def test_hf_vocab_files_rebuild_gpt2s_ranks_exactly(tmp_path):
    from tiktoken.load import load_tiktoken_bpe

    from gpt2fast.tokenizer import PACKAGED_RANKS, from_vocab_files, load_tokenizer

    ranks = load_tiktoken_bpe(str(PACKAGED_RANKS))
    bench.hf_vocab_files(ranks, str(tmp_path))
    # tiktoken's own reader of Hugging Face's format, independent of the writer, gives back every rank.
    enc = from_vocab_files(tmp_path / "vocab.json", tmp_path / "merges.txt")
    assert enc._mergeable_ranks == ranks
    text = bench.fixed_text(3000) + " naïve ünïcode 🙂"
    assert enc.encode(text) == load_tokenizer().encode(text)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262 and len(vocab) == 50257


def test_a_rank_that_is_no_merge_is_an_error(tmp_path):
    ranks = {bytes([b]): b for b in range(256)} | {b"abc": 256}  # no "ab" or "bc" below it
    with pytest.raises(ValueError, match="not a merge"):
        bench.hf_vocab_files(ranks, str(tmp_path))


@pytest.fixture(scope="module")
def ct2_result(tmp_path_factory) -> dict:
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install -e '.[bench]')")
    out = tmp_path_factory.mktemp("bench-ct2")
    status = bench.main(["--model", TINY, "--backends", "torch", "--batch-sizes", "1", "4", "--prompt-lens", "9",
                         "--contexts", "20", "--decode-tokens", "8", "--repeats", "2", "--greedy-tokens", "16",
                         "--ppl-tokens", "60", "--baselines", "hf", "ct2", "--threads", "1", "--out", str(out)])
    assert status == 0
    return json.loads((out / "bench.json").read_text())


def test_ct2_rows_run_the_same_weights_and_measurements(ct2_result):
    data = ct2_result
    names = ["gpt2fast[torch]/float32", "hf", "ct2/float32", "ct2/int8"]
    assert [(r["provider"], r["batch"]) for r in data["decode"]] == [(p, b) for p in names for b in (1, 4)]
    assert {r["provider"]: (r["backend"], r["dtype"]) for r in data["decode"]}["ct2/int8"] == ("ct2", "int8")
    assert [r["provider"] for r in data["prefill"]] == names and [r["provider"] for r in data["context"]] == names
    assert data["meta"]["engines"]["ct2"].startswith("ctranslate2 ")
    hf = {r["batch"]: r["decode_ms"] for r in data["decode"] if r["provider"] == "hf"}
    ct2_int8 = {r["batch"]: r["decode_ms"] for r in data["decode"] if r["provider"] == "ct2/int8"}
    for row in data["decode"]:  # ct2 rows get the HF ratio too, and every row the ct2-int8 one
        assert row["hf_ratio"] == pytest.approx(hf[row["batch"]] / row["decode_ms"])
    for row in data["ratios"]:
        assert row["ct2_int8_ratio"] == pytest.approx(ct2_int8[row["batch"]] / row["decode_ms"])
    int8, fp32 = (next(r for r in data["decode"] if r["provider"] == p and r["batch"] == 1)
                  for p in ("ct2/int8", "ct2/float32"))
    assert int8["floor_ms"] < 0.5 * fp32["floor_ms"]  # 1 byte a weight against 4
    table = bench.text_table(*bench.acceptance_table(data))
    assert "ct2-int8 / this b=4" in table and "RSS / ct2-int8's" in table


def test_ct2_float32_matches_the_reference_and_int8_shows_a_small_error(ct2_result):
    acc = {r["provider"]: r for r in ct2_result["accuracy"]}
    assert set(acc) == {"gpt2fast[torch]/float32", "ct2/float32", "ct2/int8"}
    fp32, int8 = acc["ct2/float32"], acc["ct2/int8"]
    assert fp32["max_abs_logit_err"] < 1e-4 and fp32["max_abs_logit_diff_hf"] < 1e-4
    assert fp32["agree_total"] == 1 and fp32["ppl_rel_diff"] < 1e-5 and fp32["flags"] == []
    assert 1e-4 < int8["max_abs_logit_err"] < bench.TOLERANCES["int8"].logits_rel  # quantized: not exact
    assert int8["ppl_rel_diff"] < bench.TOLERANCES["int8"].ppl_rel


def test_ct2_peak_rss_is_per_process_and_leaves_torch_out(ct2_result):
    rss = {r["provider"]: r for r in ct2_result["rss"]}
    assert set(rss) == {"gpt2fast[torch]/float32", "hf", "ct2/float32", "ct2/int8"}
    # ct2's child imports ctranslate2 alone; ours and HF's import torch (hundreds of MiB): a per-process number.
    assert rss["ct2/int8"]["peak_rss_mb"] < rss["gpt2fast[torch]/float32"]["peak_rss_mb"] - 100
    assert rss["ct2/int8"]["vs_ct2_int8"] == 1
    for row in rss.values():
        assert row["vs_ct2_int8"] == pytest.approx(row["peak_rss_mb"] / rss["ct2/int8"]["peak_rss_mb"])


def test_ct2_generates_exactly_n_greedy_tokens_like_ours_on_threads_asked(tmp_path, monkeypatch):
    pytest.importorskip("ctranslate2", reason="ctranslate2 is not installed (pip install -e '.[bench]')")
    started = []
    real = bench.Worker

    def worker(argv, name, work):
        started.append(argv)
        return real(argv, name, work)

    monkeypatch.setattr(bench, "Worker", worker)
    llm = bench.LLM(TINY)
    bench.save_hf_dir(llm, str(tmp_path / "hf"))
    fp32, int8 = bench.ct2_providers(llm, str(tmp_path / "hf"), threads=3, work=str(tmp_path))
    try:
        # each in its own process: CTranslate2's OpenMP runtime stays out of ours
        assert [argv[:3] for argv in started] == [[sys.executable, bench.CT2_WORKER, "serve"]] * 2
        assert [argv[4:] for argv in started] == [["float32", "--threads", "3"], ["int8_float32", "--threads", "3"]]
        assert fp32.version.startswith("ctranslate2 ")
        prompts = bench.mixed_batch(3, llm.config.vocab_size, 40)
        ours = [o.outputs[0].token_ids for o in llm.generate(
            prompts, bench.SamplingParams(max_tokens=13, temperature=0, ignore_eos=True), use_tqdm=False)]
        assert fp32.generate(prompts, 13) == ours  # exactly 13 each, never stopping at an end token
        assert [len(ids) for ids in int8.generate(prompts, 13)] == [13] * 3
        ids = prompts[0]
        assert (fp32.logits(ids) - llm.logits(ids)).abs().max() < 1e-4
        with pytest.raises(RuntimeError, match="ct2-float32 worker failed: unknown cmd"):
            fp32.close.__self__.ask(cmd="nonsense")
    finally:
        for p in (fp32, int8):
            p.close()


# A stand-in for the ORT venv's Python: it speaks bench_ort_worker.py's protocol without onnxruntime,
# and logs every command line and request it got to $STUB_LOG.
STUB_WORKER = '''
import json, os, sys, time
import numpy as np
log = open(os.environ["STUB_LOG"], "a")
log.write(json.dumps({"argv": sys.argv[1:]}) + "\\n"); log.flush()
mode = sys.argv[2]
if mode == "export":
    if os.environ.get("STUB_FAIL") == "export":
        print("optimum: cannot export", file=sys.stderr); sys.exit(3)
    print("export chatter on stdout goes first")
    print(json.dumps({"files": ["model.onnx", "model_int8.onnx"], "export_s": 0.1}))
elif mode == "rss":
    print(json.dumps({"peak_rss_mb": 123.5}))
else:
    if os.environ.get("STUB_FAIL") == "serve":
        print("Traceback: no onnxruntime here", file=sys.stderr); sys.exit(1)
    print(json.dumps({"ready": True, "rss_mb": 1.0, "versions": "stub 1.0"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        log.write(json.dumps(req) + "\\n"); log.flush()
        if req["cmd"] == "exit":
            break
        if req["cmd"] == "generate":
            time.sleep(0.002 * req["n"])  # a decode step that takes time
            reply = {"seconds": 0.0}
            if req.get("ids"):
                reply["ids"] = [[(sum(p) + i) % 50257 for i in range(req["n"])] for p in req["prompts"]]
            print(json.dumps(reply), flush=True)
        elif req["cmd"] == "logits":
            vocab = int(os.environ.get("STUB_VOCAB", 5))
            np.save(req["out"], np.arange(len(req["ids"]) * vocab, dtype=np.float32).reshape(-1, vocab) / vocab)
            print(json.dumps({"shape": [len(req["ids"]), vocab]}), flush=True)
        else:
            print(json.dumps({"error": "unknown"}), flush=True)
'''


@pytest.fixture
def stub_python(tmp_path, monkeypatch) -> tuple[str, object]:
    script = tmp_path / "stub_worker.py"
    script.write_text(STUB_WORKER)
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} {script} "$@"\n')
    python.chmod(0o755)
    log = tmp_path / "stub.log"
    monkeypatch.setenv("STUB_LOG", str(log))
    return str(python), lambda: [json.loads(line) for line in log.read_text().splitlines()]


def test_ort_worker_protocol_against_a_stub_python(tmp_path, stub_python):
    python, log = stub_python
    llm = bench.LLM(TINY)
    fp32, int8 = bench.ort_providers(python, llm, str(tmp_path / "hf"), threads=3, work=str(tmp_path))
    assert [(p.name, p.backend, p.dtype, p.quantization) for p in (fp32, int8)] == [
        ("ort/float32", "ort", "float32", None), ("ort/int8", "ort", "int8", "int8")]
    assert fp32.version == "stub 1.0"
    fp32.generate([[1, 2], [3]], 4)
    assert int8.greedy([5, 6], 3) == [11, 12, 13]
    expected = bench.torch.arange(15, dtype=bench.torch.float32).reshape(3, 5) / 5
    bench.torch.testing.assert_close(fp32.logits([1, 2, 3]), expected)
    assert int8.rss([[7, 8]], 16) == 123.5
    for p in (fp32, int8):
        p.close()
    calls = log()
    argvs = [c["argv"][1:] for c in calls if "argv" in c]  # after the worker's path
    assert calls[0]["argv"][0] == bench.ORT_WORKER
    assert argvs[0] == ["export", str(tmp_path / "hf"), str(tmp_path / "onnx"), "--int8"]
    onnx = str(tmp_path / "onnx")
    assert argvs[1:3] == [["serve", onnx, "model.onnx", "--threads", "3"], ["serve", onnx, "model_int8.onnx",
                                                                             "--threads", "3"]]
    assert argvs[3] == ["rss", onnx, "model_int8.onnx", "--threads", "3", "--prompts", "[[7, 8]]", "--tokens", "16"]
    requests = [c for c in calls if "cmd" in c]
    assert requests[0] == {"cmd": "generate", "prompts": [[1, 2], [3]], "n": 4}
    assert requests[1] == {"cmd": "generate", "prompts": [[5, 6]], "n": 3, "ids": True}
    assert [r["cmd"] for r in requests[2:]] == ["logits", "exit", "exit"]


@pytest.mark.parametrize("fail", ["export", "serve"])
def test_a_failing_ort_worker_is_skipped_with_its_stderr(tmp_path, stub_python, monkeypatch, fail):
    python, _ = stub_python
    monkeypatch.setenv("STUB_FAIL", fail)
    args = bench.resolve_args(bench.build_parser().parse_args(["--model", TINY, "--baselines", "ort",
                                                               "--ort-python", python]))
    llm = bench.LLM(TINY)
    skipped: list[str] = []
    assert bench.baselines(args, llm, llm, skipped, str(tmp_path)) == []
    (note,) = skipped
    assert note.startswith(f"ort ({python}): ")
    assert ("optimum: cannot export" if fail == "export" else "no onnxruntime here") in note


def test_without_an_ort_python_ort_is_skipped_saying_how_to_set_it_up(tmp_path, monkeypatch):
    monkeypatch.delenv("GPT2FAST_ORT_PYTHON", raising=False)
    args = bench.resolve_args(bench.build_parser().parse_args(["--model", TINY, "--baselines", "ort"]))
    llm = bench.LLM(TINY)
    skipped: list[str] = []
    assert bench.baselines(args, llm, llm, skipped, str(tmp_path)) == []
    (note,) = skipped
    assert "GPT2FAST_ORT_PYTHON" in note and "optimum-onnx" in note and "transformers<4.58" in note
    monkeypatch.setenv("GPT2FAST_ORT_PYTHON", "/venv/bin/python")
    assert bench.ort_python(args) == "/venv/bin/python"


@pytest.mark.skipif(not os.environ.get("GPT2FAST_ORT_PYTHON"), reason="no ONNX Runtime venv: set GPT2FAST_ORT_PYTHON "
                    "(benchmarks/README.md)")
def test_ort_for_real_matches_the_reference(tmp_path):
    llm = bench.LLM(TINY)
    bench.save_hf_dir(llm, str(tmp_path / "hf"))
    fp32, int8 = bench.ort_providers(os.environ["GPT2FAST_ORT_PYTHON"], llm, str(tmp_path / "hf"), 1, str(tmp_path))
    try:
        ids = bench.random_prompt(30, llm.config.vocab_size, seed=1)
        assert (fp32.logits(ids) - llm.logits(ids)).abs().max() < 1e-4
        assert 0 < (int8.logits(ids) - llm.logits(ids)).abs().max() < bench.TOLERANCES["int8"].logits_rel
        assert fp32.greedy(ids[:9], 12) == bench.greedy_tokens(llm, ids[:9], 12)
        assert 200 < int8.rss(bench.mixed_batch(2, llm.config.vocab_size, 30), 4) < 4000
    finally:
        fp32.close()
        int8.close()


# ---- peak RSS, --threads, --quantization ---------------------------------------------------------------


def test_rss_child_reports_its_own_peak_not_its_parents():
    import torch

    spec = dict(kind="ours", model=TINY, backend="torch", dtype="float32", quantization=None)
    prompts = bench.mixed_batch(2, 50257, 30)
    ballast = torch.ones(300 * 2**20 // 4)  # 300 MiB touched in this process: a child must not count it
    small = bench.child_rss(spec, prompts, 4, threads=1)
    wide = 'random:{"n_layer": 2, "n_embd": 512, "n_head": 4, "n_positions": 128}'
    big = bench.child_rss(spec | dict(model=wide), prompts, 4, threads=1)
    del ballast
    weights = 4 * (50257 - 64) * 512  # the embedding alone grows by this much
    assert 100 < small < bench.peak_memory_mb(torch.device("cpu"))
    assert big - small > 0.9 * weights / 2**20


def test_rss_child_errors_name_the_failure():
    spec = dict(kind="ours", model="random:nope", backend="torch", dtype="float32", quantization=None)
    with pytest.raises(RuntimeError, match="RSS child for ours failed"):
        bench.child_rss(spec, [[1]], 1, threads=1)
    skipped: list[str] = []
    p = bench.Provider("x", "torch", "float32", lambda prompts, n: None, bench.LLM(TINY),
                       rss=lambda prompts, n: bench.child_rss(spec, prompts, n, 1))
    assert bench.measure_rss(p, skipped) is None and skipped[0].startswith("peak RSS of x: the RSS child")


def test_threads_reach_every_provider_and_the_meta(tmp_path, stub_python, monkeypatch):
    import torch

    python, log = stub_python
    monkeypatch.setenv("STUB_VOCAB", "50257")
    seen = []
    real = bench.run

    def run(args):
        seen.append(torch.get_num_threads())
        return real(args)

    monkeypatch.setattr(bench, "run", run)
    before = torch.get_num_threads()
    assert bench.main(["--model", TINY, "--backends", "torch", "--batch-sizes", "1", "--prompt-lens", "5",
                       "--contexts", "5", "--decode-tokens", "8", "--repeats", "3", "--greedy-tokens", "3",
                       "--ppl-tokens", "10", "--baselines", "ort", "--ort-python", python, "--threads", "2",
                       "--out", str(tmp_path)]) == 0
    assert seen == [2] and torch.get_num_threads() == before
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["threads"] == 2 and data["meta"]["engines"] == {"ort": "stub 1.0"}
    serves = [c["argv"] for c in log() if "argv" in c and c["argv"][1] in ("serve", "rss")]
    assert serves and all(argv[argv.index("--threads") + 1] == "2" for argv in serves)
    assert {r["provider"] for r in data["rss"]} == {"gpt2fast[torch]/float32", "ort/float32", "ort/int8"}
    assert [r["provider"] for r in data["accuracy"]] == ["gpt2fast[torch]/float32", "ort/float32", "ort/int8"]
    assert "logits" in data["accuracy"][1]["flags"]  # the stub's logits are not the model's: caught


def test_quantization_axis_names_int8_rows(monkeypatch):
    real_llm = bench.LLM
    made = []

    def llm(model: str, quantization: str | None = None, **kwargs):  # an LLM that takes quantization=
        made.append(quantization)
        return real_llm(model, **kwargs)

    monkeypatch.setattr(bench, "LLM", llm)
    args = bench.resolve_args(bench.build_parser().parse_args(["--model", TINY, "--backends", "torch",
                                                               "--quantization", "none", "int8", "int8"]))
    assert args.quantization == [None, "int8"]
    skipped: list[str] = []
    providers = bench.load_providers(args, skipped)
    assert made == [None, "int8"] and skipped == []
    assert [(p.name, p.dtype, p.quantization) for p in providers] == [
        ("gpt2fast[torch]/float32", "float32", None), ("gpt2fast[torch]/int8", "int8", "int8")]
    assert providers[1].llm.dtype == bench.torch.float32  # the model dtype stays fp32


def test_a_backend_refusing_int8_is_skipped_with_the_reason(monkeypatch):
    real_llm = bench.LLM

    def llm(model: str, **kwargs):  # a backend without int8 kernels (check_quantization_support refuses it so)
        if kwargs.get("quantization") == "int8":
            raise ValueError("backend 'torch' has no int8 kernels yet")
        return real_llm(model, **kwargs)

    monkeypatch.setattr(bench, "LLM", llm)
    args = bench.resolve_args(bench.build_parser().parse_args(["--model", TINY, "--backends", "torch",
                                                               "--quantization", "none", "int8"]))
    skipped: list[str] = []
    assert [p.name for p in bench.load_providers(args, skipped)] == ["gpt2fast[torch]/float32"]
    assert skipped == ["backend torch / auto / int8: backend 'torch' has no int8 kernels yet"]
    args.quantization = ["int8"]
    with pytest.raises(ValueError, match="no gpt2fast provider could run"):
        bench.load_providers(args, [])


def test_int8_end_to_end_within_its_tolerance(tmp_path):
    assert bench.main(["--model", TINY, "--backends", "torch", "--quantization", "none", "int8", "--batch-sizes", "1",
                       "--prompt-lens", "5", "--contexts", "5", "--decode-tokens", "4", "--repeats", "1",
                       "--greedy-tokens", "12", "--ppl-tokens", "50", "--baselines", "--threads", "1",
                       "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    fp32, int8 = data["accuracy"]
    assert int8["provider"] == "gpt2fast[torch]/int8" and int8["dtype"] == "int8"
    assert 0 < int8["max_abs_logit_err"] and int8["flags"] == []
    assert {r["provider"] for r in data["overhead"]} == {fp32["provider"], int8["provider"]}
    assert {r["provider"] for r in data["rss"]} == {fp32["provider"], int8["provider"]}


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU the script runs for real")
def test_gpu_check_script_refuses_a_machine_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.sh (the GPU acceptance run) checks first that torch sees a GPU: here it says so and
    exits 2 before building or writing anything."""
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gpu_check.sh")
    done = subprocess.run(["bash", script, str(tmp_path / "out")], capture_output=True, text=True, timeout=60,
                          env=os.environ | {"PYTHON": sys.executable})
    assert done.returncode == 2 and "sees no CUDA GPU; run this on a GPU machine" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []
