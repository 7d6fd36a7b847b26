"""``gpt2fast bench`` on a tiny random model: the JSON schema, every number finite and positive, the reports."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gpt2fast import bench

TINY = 'random:{"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 128}'
META_KEYS = {"model", "device", "device_name", "machine", "cpu_count", "threads", "load_avg_1m", "python", "torch",
             "transformers", "triton", "gpt2fast", "config", "dtypes", "bandwidth_gbs", "quick", "peak_mem_kind",
             "tolerances", "skipped", "wall_s"}
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
STRINGS = {"provider", "backend", "dtype"}


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
    assert set(data) == {"meta", "decode", "context", "prefill", "overhead", "launches", "accuracy"}
    assert set(data["meta"]) == META_KEYS
    sections = [("decode", DECODE_KEYS), ("context", CONTEXT_KEYS), ("prefill", PREFILL_KEYS),
                ("overhead", OVERHEAD_KEYS), ("accuracy", ACCURACY_KEYS)]
    for section, keys in sections:
        assert data[section], section
        for row in data[section]:
            expected = keys - {"hf_ratio"} if row.get("overhead_us") == 0 else keys  # no ratio to a zero
            assert set(row) == expected, (section, set(row) ^ expected)
            assert all(isinstance(row[k], str) for k in STRINGS)
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
    for title in ("## Decode", "## Decode time vs context", "## Prefill", "## Runtime overhead", "## Accuracy",
                  "% of floor", "max|err| vs fp32", "hf / this"):
        assert title in markdown


def test_cli_help_and_bad_arguments():
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "gpt2fast", "bench", *args], capture_output=True, text=True,
                              timeout=60)

    shown = cli("--help")
    assert shown.returncode == 0 and "--quick" in shown.stdout and "--backends" in shown.stdout
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
