"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys

from conftest import TINY

TINY_RANDOM = 'random:{"n_layer": 1, "n_embd": 32, "n_head": 2}'


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2fast", *args], capture_output=True, text=True, timeout=120)


def test_generate_with_random_weights_warns_and_prints_the_prompt_and_completion():
    result = run("generate", "--model", TINY_RANDOM, "--prompt", "Hello world", "--max-tokens", "5",
                 "--temperature", "0.8", "--top-k", "40", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello world") and len(result.stdout) > len("Hello world\n")
    assert "random weights" in result.stderr and "gibberish" in result.stderr
    again = run("generate", "--model", TINY_RANDOM, "--prompt", "Hello world", "--max-tokens", "5",
                "--temperature", "0.8", "--top-k", "40", "--seed", "3")
    assert again.stdout == result.stdout


def test_greedy_from_a_folder_matches_the_api(hf_folder):
    from gpt2fast import LLM, SamplingParams

    _, folder = hf_folder(TINY)
    result = run("generate", "--model", str(folder), "--prompt", "", "--max-tokens", "4", "--temperature", "0")
    # The tiny model's vocabulary lacks <|endoftext|>: unconditional generation is refused with a clear message.
    assert result.returncode == 2 and "unconditional generation starts from <|endoftext|>" in result.stderr
    assert "Traceback" not in result.stderr
    llm = LLM(str(folder), device="cpu")
    assert llm.generate([1, 2], SamplingParams(max_tokens=4, temperature=0))[0].outputs[0].token_ids


def test_bad_input_exits_2_with_one_line():
    for args, message in [
        (["--model", "/no/such/folder"], "no such checkpoint folder"),
        (["--model", "random:gpt-9"], "unknown preset 'gpt-9'"),
        (["--model", TINY_RANDOM, "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    ]:
        result = run("generate", *args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("gpt2fast: error: ") and message in result.stderr
        assert "Traceback" not in result.stderr
