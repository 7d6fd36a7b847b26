"""The command line, run as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gpt2fast import LLM, SamplingParams, cli

# GPT-2's own vocabulary, so text prompts and <|endoftext|> work; tiny otherwise.
TINY_RANDOM = 'random:{"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 64}'


def run(*args: str, stdin: str | int | None = None, **kwargs) -> subprocess.CompletedProcess:
    """``gpt2fast generate --model TINY_RANDOM ARGS``; ``stdin`` is text to pipe in, or ``subprocess.DEVNULL``."""
    where = {"input": stdin} if isinstance(stdin, str) else {"stdin": stdin}
    return subprocess.run([sys.executable, "-m", "gpt2fast", "generate", "--model", TINY_RANDOM, *args],
                          **where, capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(TINY_RANDOM, device="cpu")


def test_greedy_output_equals_the_api_and_random_weights_warn(llm):
    result = run("--prompt", "Hello world", "--length", "6", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    expected = llm.generate("Hello world", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0].text
    assert result.stdout == "Hello world" + expected + "\n"
    assert "random weights" in result.stderr and "gibberish" in result.stderr


def samples_printed(stdout: str) -> list[str]:
    """The texts between ``==== SAMPLE i ====`` headers (each ends with the newline print adds)."""
    parts = stdout.split(f"{'=' * 40} SAMPLE ")[1:]
    return [part.split("\n", 1)[1].removesuffix("=" * 80 + "\n") for part in parts]


def test_a_seed_gives_the_same_samples_whatever_the_batch_size(llm, capsys):
    def generate(seed: int, batch_size: int) -> str:  # in this process: four model loads, not four start-ups
        args = ["--prompt", "The dog", "--nsamples", "4", "--length", "6", "--top-k", "40", "--seed", str(seed)]
        assert cli.main(["generate", "--model", TINY_RANDOM, *args, "--batch-size", str(batch_size)]) == 0
        return capsys.readouterr().out

    printed = {b: generate(7, b) for b in (1, 2, 4)}
    headers = [line for line in printed[1].splitlines() if "SAMPLE" in line]
    assert headers == [f"{'=' * 40} SAMPLE {i} {'=' * 40}" for i in range(1, 5)]
    assert printed[1] == printed[2] == printed[4]
    # Sample k is the library's one sample with seed sample_seed(7, k); sample 1 is plain seed 7.
    expected = [llm.generate("The dog", SamplingParams(max_tokens=6, top_k=40, seed=cli.sample_seed(7, k)))[0]
                .outputs[0].text for k in range(4)]
    assert cli.sample_seed(7, 0) == 7
    assert samples_printed(printed[2]) == [f"The dog{text}\n" for text in expected]
    assert len(set(expected)) > 1  # the samples differ from one another
    assert generate(8, 2) != printed[2]


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


@pytest.mark.parametrize("stdin", [subprocess.DEVNULL, "", "\n\n"], ids=["devnull", "empty", "blank-lines"])
def test_no_prompt_from_a_non_terminal_stdin_exits_2_saying_so(stdin):
    """Before any weights load: no 'Model prompt >>>' and no random-weights warning."""
    result = run("--length", "3", stdin=stdin)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == "" and len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("gpt2fast: error: no prompt: stdin is not a terminal")
    assert "--prompt" in result.stderr and "--unconditional" in result.stderr


def test_a_hub_id_offline_and_not_cached_is_one_short_line(tmp_path):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}  # an empty cache: nothing cached
    result = subprocess.run([sys.executable, "-m", "gpt2fast", "generate", "--model", "openai-community/gpt2",
                             "--prompt", "x"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and len(result.stderr) < 500, result.stderr
    line = result.stderr
    assert line.startswith("gpt2fast: error: could not get 'openai-community/gpt2' from the Hugging Face Hub")
    assert "offline" in line and "--model /path/to/folder" in line
    assert "Error" not in line and "HF_HUB_OFFLINE=0" not in line  # not huggingface_hub's own exception text


BAD = [  # a later --model overrides run()'s
    (["--prompt", "x", "--model", "/no/such/folder"], "no such checkpoint folder"),
    (["--prompt", "x", "--model", "random:gpt-9"], "unknown preset 'gpt-9'"),
    (["--prompt", "x", "--max-tokens", "0"], "--max-tokens/--length must be an integer >= 1"),
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


# Every generate flag with a bad value: exit 2 and one line naming the flag (not the library's Python name).
BAD_FLAGS = [
    (["--max-tokens", "-3"], "--max-tokens/--length must be an integer >= 1, got -3"),
    (["--length", "0"], "--max-tokens/--length must be an integer >= 1, got 0"),
    (["--nsamples", "0"], "--nsamples must be a positive integer, got 0"),
    (["--nsamples", "-2"], "--nsamples must be a positive integer, got -2"),
    (["--batch-size", "0"], "--batch-size must divide --nsamples (1), got 0"),
    (["--nsamples", "3", "--batch-size", "6"], "--batch-size must divide --nsamples (3), got 6"),
    (["--temperature", "-0.5"], "--temperature must be in [0, inf), got -0.5"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--top-k", "-2"], "--top-k must be an integer >= -1, got -2"),
    (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1], got 1.5"),
    (["--seed", "-1"], "--seed must be an integer in [0, 18446744073709551615], got -1"),
    (["--seed", str(2**64)], "--seed must be an integer in [0, 18446744073709551615]"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--device", "cuda:x"], "--device 'cuda:x'"),
    (["--nsamples", "2", "--stream"], "--stream prints one sample"),
]
if not __import__("torch").cuda.is_available():
    BAD_FLAGS.append((["--device", "cuda"], "--device 'cuda' was requested but this PyTorch sees no CUDA GPU; "
                                            "use --device cpu"))


@pytest.mark.parametrize("args, message", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_every_generate_flag_with_a_bad_value_is_named_in_one_line(args, message, capsys):
    assert cli.main(["generate", "--model", TINY_RANDOM, "--prompt", "x", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith("gpt2fast: error: ") and message in captured.err, captured.err
    assert "SamplingParams" not in captured.err and "device=" not in captured.err


def test_prompt_file_that_is_not_utf8_is_named(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    assert cli.main(["generate", "--model", TINY_RANDOM, "--prompt-file", str(path)]) == 2
    assert "cannot read --prompt-file" in capsys.readouterr().err


def test_the_flag_table_renames_only_whole_library_names():
    assert cli.name_flags("SamplingParams.top_k must be an integer >= -1") == "--top-k must be an integer >= -1"
    assert cli.name_flags(cli.name_flags("unknown device 'x'")) == "unknown --device 'x'"  # idempotent
    assert cli.name_flags("mydevice 'x'") == "mydevice 'x'"


def test_a_request_whose_logits_overflow_exits_1_with_one_line(tmp_path, capsys):
    """Finite weights can still overflow: a huge final-LayerNorm bias sends every logit past fp32's range."""
    from conftest import TINY, hf_model, save_hf

    model = hf_model(TINY)
    model.transformer.ln_f.bias.data.fill_(3e38)  # finite, so the load-time check passes; logits are not
    folder = save_hf(model, tmp_path / "overflow", "safetensors")
    capsys.readouterr()  # what transformers said while writing the folder
    args = ["generate", "--model", str(folder), "--prompt", "a b", "--length", "3", "--temperature", "0"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gpt2fast: error: ") and "not finite" in err[0], err
