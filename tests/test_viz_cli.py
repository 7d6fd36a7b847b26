"""``gpt2fast attention`` (gpt2fast.viz.cli): the page it writes holds the attention of a second, independent
``LLM.attention`` of the same text, opens in headless chromium with every layer x head drawn, ``--png`` writes
the heat maps, bad input exits 2 with one line, and ``python -m gpt2fast attention`` works as a command."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from browser import chromium, open_page, save_screenshot

from gpt2fast import LLM
from gpt2fast.viz.cli import main

MODEL = 'random:{"n_layer": 3, "n_embd": 24, "n_head": 3}'  # odd sizes: 3 layers x 3 heads of 8 dims
SHORT_MODEL = 'random:{"n_layer": 1, "n_embd": 16, "n_head": 2, "n_positions": 16}'
TEXT = "The dog on the ship ran to the captain, who laughed."


@pytest.fixture(scope="module")
def reference() -> LLM:
    return LLM(MODEL)


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


def embedded_payload(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="[\w-]+">(.*?)</script>', page, re.S)
    assert match, "payload script not found"
    return json.loads(match.group(1))


def link_probs(payload: dict) -> np.ndarray:
    """(L, H, T, T) attention rebuilt from the payload's links (all kept for short texts), 0 where none."""
    n_layer, n_head, n_tokens = payload["n_layer"], payload["n_head"], len(payload["tokens"])
    assert payload["links"]["per_row"] == n_tokens
    index = np.frombuffer(base64.b64decode(payload["links"]["index"]), dtype="<u2")
    prob = np.frombuffer(base64.b64decode(payload["links"]["prob"]), dtype="<u2") / 65535
    rows = np.repeat(np.arange(n_tokens), np.arange(1, n_tokens + 1))  # query of each stored link, one head
    out = np.zeros((n_layer * n_head, n_tokens, n_tokens))
    per_head = rows.size
    for lh in range(n_layer * n_head):
        out[lh, rows, index[lh * per_head:(lh + 1) * per_head]] = prob[lh * per_head:(lh + 1) * per_head]
    return out.reshape(n_layer, n_head, n_tokens, n_tokens)


def test_model_view_page_opens_in_chromium(browser, reference, tmp_path, capsys):
    out = tmp_path / "sub" / "attn.html"  # a folder that does not exist yet
    assert main(["--model", MODEL, "--text", TEXT, "--out", str(out), "--view", "model"]) == 0
    want = reference.attention(TEXT)
    n_tokens = len(want.tokens)
    assert f"wrote {out} ({n_tokens} tokens, 3 layers x 3 heads, view model" in capsys.readouterr().out
    payload = embedded_payload(out.read_text(encoding="utf-8"))
    assert payload["tokens"] == want.tokens and payload["qk"] is None  # the model view needs no q/k
    np.testing.assert_allclose(link_probs(payload), want.probs.double().numpy(), atol=1 / 65535)
    with open_page(browser) as (page, errors):
        page.goto(out.as_uri())
        page.wait_for_selector(".g2f-root[data-g2f-done]", state="attached")
        cells = page.eval_on_selector_all(".g2f-cell", "els => els.map(e => [+e.dataset.layer, +e.dataset.head])")
        assert sorted(cells) == [[layer, head] for layer in range(3) for head in range(3)]
        assert page.evaluate("document.querySelectorAll('.g2f-cell canvas').length") == 9
        save_screenshot(page, "viz_cli_model_view", tmp_path)
        page.click('.g2f-cell[data-layer="2"][data-head="1"]')  # opens that head with every (query, key) link
        page.mouse.move(1, 1)  # the pointer may land on a token of the head view, which isolates that token's lines
        lines = page.eval_on_selector_all(".g2f-head-section svg.g2f-lines line", "els => els.length")
        assert lines == n_tokens * (n_tokens + 1) // 2
    assert errors == []


def test_default_view_keeps_qk_and_png_writes_heat_maps(reference, tmp_path, capsys):
    out, pngs = tmp_path / "attn.html", tmp_path / "png"
    assert main(["--model", MODEL, "--text", TEXT, "--out", str(out), "--png", str(pngs)]) == 0
    printed = capsys.readouterr().out
    names = ["attention_layer00.png", "attention_layer01.png", "attention_layer02.png", "attention_model.png"]
    assert f"wrote 4 PNGs to {pngs}: {', '.join(names)}" in printed
    assert sorted(path.name for path in pngs.iterdir()) == names
    for name in names:
        assert (pngs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    want = reference.attention(TEXT, qk=True)
    qk = embedded_payload(out.read_text(encoding="utf-8"))["qk"]
    assert (qk["n_tokens"], qk["head_dim"]) == (len(want.tokens), 8)
    queries = np.frombuffer(base64.b64decode(qk["q"]), dtype="<f2").reshape(3, 3, len(want.tokens), 8)
    np.testing.assert_array_equal(queries, want.queries.numpy().astype(np.float16))


def test_text_file_and_title(tmp_path):
    text_file, out = tmp_path / "story.txt", tmp_path / "attn.html"
    text_file.write_text("Line one.\nLine\ttwo <b>", encoding="utf-8")
    assert main(["--model", MODEL, "--text-file", str(text_file), "--out", str(out), "--view", "head",
                 "--title", "<b>my title</b>"]) == 0
    page = out.read_text(encoding="utf-8")
    assert "<title>&lt;b&gt;my title&lt;/b&gt;</title>" in page
    payload = embedded_payload(page)
    assert "".join(payload["tokens"]) == text_file.read_text(encoding="utf-8") and payload["qk"] is None


@pytest.mark.parametrize("args,message", [
    (["--model", MODEL, "--text", ""], "empty"),
    (["--model", SHORT_MODEL, "--text", " a" * 17], "17 tokens; the model's context is 16"),
    (["--model", "/no/such/folder", "--text", "hi"], "/no/such/folder"),
    (["--model", MODEL, "--text-file", "/no/such/file.txt"], "cannot read --text-file"),
    (["--model", MODEL, "--text", "hi", "--view", "heads"], "invalid choice: 'heads'"),
    (["--model", MODEL], "one of the arguments --text --text-file is required"),
])
def test_bad_input_exits_2_with_one_line(args, message, tmp_path, capsys):
    out = tmp_path / "attn.html"
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpt2fast attention: error: ") and message in err[-1], err
    assert not out.exists()


def test_python_m_gpt2fast_attention(tmp_path):
    out = tmp_path / "attn.html"
    done = subprocess.run([sys.executable, "-m", "gpt2fast", "attention", "--model", MODEL, "--text", "Hello there",
                           "--out", str(out), "--view", "qk"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {out} (2 tokens, 3 layers x 3 heads, view qk, " \
        f"{out.stat().st_size / 1e6:.2f} MB)"
    assert "random weights" in done.stderr
    payload = embedded_payload(out.read_text(encoding="utf-8"))
    assert payload["tokens"] == ["Hello", " there"] and payload["qk"]["n_tokens"] == 2
    bad = subprocess.run([sys.executable, "-m", "gpt2fast", "attention", "--model", MODEL, "--text", ""],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("gpt2fast attention: error:")
