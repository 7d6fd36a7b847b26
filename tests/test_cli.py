"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gpt2fast import LLM, SamplingParams

# GPT-2's own vocabulary, so text prompts and <|endoftext|> work; tiny otherwise.
TINY_RANDOM = 'random:{"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}'


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2fast", "generate", "--model", TINY_RANDOM, *args],
                          input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(TINY_RANDOM, device="cpu")


def test_greedy_output_equals_the_api_and_random_weights_warn(llm):
    result = run("--prompt", "Hello world", "--length", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    expected = llm.generate("Hello world", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    assert result.stdout == "Hello world" + expected + "\n"
    assert "random weights" in result.stderr and "gibberish" in result.stderr


def test_nsamples_in_batches_print_every_sample_and_repeat_with_a_seed(llm):
    args = ("--unconditional", "--nsamples", "4", "--batch-size", "2", "--length", "5", "--top-k", "40", "--seed", "7")
    result = run(*args)
    assert result.returncode == 0, result.stderr
    headers = [line for line in result.stdout.splitlines() if "SAMPLE" in line]
    assert headers == [f"{'=' * 40} SAMPLE {i} {'=' * 40}" for i in range(1, 5)]
    for seed in (7, 8):  # round r of a seeded run uses seed + r
        for sample in llm.generate("", SamplingParams(max_tokens=5, top_k=40, seed=seed, n=2))[0].outputs:
            assert sample.text in result.stdout
    assert run(*args).stdout == result.stdout


def test_interactive_until_end_of_input(llm):
    result = run("--length", "3", "--temperature", "0", stdin="\nOnce upon\nThe end\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Model prompt >>> ") == 4  # three lines, then end of input
    assert "Prompt should not be empty!" in result.stdout
    for prompt in ("Once upon", "The end"):
        text = llm.generate(prompt, SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].text
        assert prompt + text in result.stdout


def test_prompt_file_and_stream(llm, tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("A prompt from a file", encoding="utf-8")
    streamed = run("--prompt-file", str(path), "--length", "5", "--temperature", "0", "--stream")
    plain = run("--prompt-file", str(path), "--length", "5", "--temperature", "0")
    assert streamed.returncode == plain.returncode == 0
    assert streamed.stdout == plain.stdout and plain.stdout.startswith("A prompt from a file")


BAD = [  # a later --model overrides run()'s
    (["--prompt", "x", "--model", "/no/such/folder"], "no such checkpoint folder"),
    (["--prompt", "x", "--model", "random:gpt-9"], "unknown preset 'gpt-9'"),
    (["--prompt", "x", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["--prompt", "x", "--nsamples", "2", "--batch-size", "3"], "--batch-size must divide --nsamples (2)"),
    (["--prompt", "x", "--nsamples", "4", "--batch-size", "3"], "--batch-size must divide --nsamples (4)"),
    (["--prompt", "x", "--nsamples", "2", "--stream"], "--stream prints one sample"),
    (["--prompt-file", "/no/such/file"], "cannot read --prompt-file"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_bad_input_exits_2_with_one_line(args, message):
    result = run(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1].startswith("gpt2fast: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr
