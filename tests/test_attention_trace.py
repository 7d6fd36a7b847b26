"""LLM.attention and LLM.next_tokens against a float64 recomputation and Hugging Face's eager attention.

The float64 check rebuilds GPT-2's forward from the model's own weights with plain ``torch.nn.functional``
(no gpt2fast op), so a capture that records the wrong layer, the wrong scale or a leaky mask cannot agree
with it. The attention weights are sharpened so the probabilities are far from uniform (a wrong scale or
mask moves them by much more than the tolerance).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model, save_hf

from gpt2fast import LLM, SamplingParams
from gpt2fast.model import AttentionCapture
from gpt2fast.ops import cuda_build
from gpt2fast.ops import triton as triton_backend
from gpt2fast.trace import AttentionTrace, NextToken

# Odd sizes: 5 heads of 12, an MLP of 100, a vocabulary of 777, 19 tokens over 3 pages of 8.
TINY = dict(n_layer=2, n_embd=60, n_head=5, n_inner=100, vocab_size=777, n_positions=48,
            scale_attn_by_inverse_layer_idx=True)
# The CUDA backend's own kernels (embed, LayerNorms, GEMV linears up to 16 rows) on its tested shape; 13 tokens.
CUDA_TINY = dict(n_layer=2, n_embd=192, n_head=3, n_inner=200, vocab_size=555, n_positions=40)
_EMU_REASON = cuda_build.emulator_unavailable_reason()
BACKENDS = [
    pytest.param("reference", TINY, 19, id="reference"),
    pytest.param("torch", TINY, 19, id="torch"),
    pytest.param("triton", TINY, 19, id="triton", marks=pytest.mark.skipif(
        not triton_backend.available(), reason=triton_backend.UNAVAILABLE)),
    pytest.param("cuda", CUDA_TINY, 13, id="cuda", marks=pytest.mark.skipif(
        bool(_EMU_REASON), reason=_EMU_REASON or "available")),
]
# Hugging Face parity on an odd config: 3 layers, 5 heads of 12, inverse-layer scaling.
HF_ODD = dict(n_layer=3, n_embd=60, n_head=5, vocab_size=777, n_positions=64, n_inner=100,
              scale_attn_by_inverse_layer_idx=True)
SHARPEN = 12.0  # c_attn weights x12: peaked attention rows
# For the text and input tests: GPT-2's whole vocabulary, so any text tokenizes into valid ids.
TEXT = dict(TINY, vocab_size=50257)


def random_llm(config: dict, backend: str = "torch", seed: int = 3) -> LLM:
    llm = LLM("random:" + json.dumps(config), backend=backend, device="cpu", seed=seed, block_size=8,
              kv_cache_tokens=4 * config["n_positions"])
    with torch.no_grad():
        for block in llm.model.h:
            block.attn.c_attn.weight.mul_(SHARPEN)
    return llm


def assert_peaked(probs: torch.Tensor) -> None:
    """Rows that see 9 keys or more (uniform: at most 1/9) put over half their weight on one key somewhere, so
    a wrong scale or mask cannot hide inside the tolerance."""
    assert bool((probs[..., 8:, :].amax(-1) > 0.5).any()), "attention is close to uniform: sharpen the weights"


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def float64_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(mask(scale * q k^T)) in float64: (..., T, D) x2 -> (..., T, T)."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale  # (..., T, T)
    num_tokens = q.shape[-2]
    future = ~torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def float64_forward(llm: LLM, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per layer (q, k, probs) of GPT-2 run in float64 from the model's weights: (L, H, T, D) x2, (L, H, T, T)."""
    cfg = llm.config
    w = {name: t.double() for name, t in llm.model.state_dict().items()}
    num_tokens, c = len(ids), cfg.n_embd

    def ln(x, name):
        return F.layer_norm(x, (c,), w[name + ".weight"], w[name + ".bias"], cfg.layer_norm_epsilon)

    def linear(x, name):
        return F.linear(x, w[name + ".weight"], w[name + ".bias"])

    x = w["wte.weight"][ids] + w["wpe.weight"][:num_tokens]  # (T, C)
    qs, ks, ps = [], [], []
    for i in range(cfg.n_layer):
        qkv = linear(ln(x, f"h.{i}.ln_1"), f"h.{i}.attn.c_attn")  # (T, 3C)
        q, k, v = qkv.view(num_tokens, 3, cfg.n_head, cfg.head_dim).permute(1, 2, 0, 3)  # 3 x (H, T, D)
        probs = float64_probs(q, k, cfg.attn_scale(i))  # (H, T, T)
        x = x + linear((probs @ v).transpose(0, 1).reshape(num_tokens, c), f"h.{i}.attn.c_proj")
        x = x + linear(F.gelu(linear(ln(x, f"h.{i}.ln_2"), f"h.{i}.mlp.c_fc"), approximate="tanh"),
                       f"h.{i}.mlp.c_proj")
        qs.append(q)
        ks.append(k)
        ps.append(probs)
    return torch.stack(qs), torch.stack(ks), torch.stack(ps)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return random_llm(TEXT)


@pytest.fixture(scope="module")
def backend_llm():
    """``backend_llm(backend, config)``: one sharpened random LLM per backend for the module."""
    made: dict[str, LLM] = {}

    def get(backend: str, config: dict) -> LLM:
        if backend not in made:
            made[backend] = random_llm(config, backend)
        return made[backend]

    return get


# ---- every backend against float64 -------------------------------------------------------------------


@pytest.mark.parametrize("backend, config, num_tokens", BACKENDS)
def test_captured_probs_equal_float64_softmax_of_the_models_qk(backend_llm, backend, config, num_tokens):
    llm = backend_llm(backend, config)
    assert llm.backend == backend
    ids = random_ids(num_tokens, config["vocab_size"])
    trace = llm.attention(ids, qk=True)
    shape = (config["n_layer"], config["n_head"], num_tokens)
    head_dim = config["n_embd"] // config["n_head"]
    assert trace.probs.shape == (*shape, num_tokens) and trace.queries.shape == trace.keys.shape == (*shape, head_dim)
    assert {t.dtype for t in (trace.probs, trace.queries, trace.keys)} == {torch.float32}
    assert {t.device.type for t in (trace.probs, trace.queries, trace.keys)} == {"cpu"}

    q64, k64, p64 = float64_forward(llm, ids)
    torch.testing.assert_close(trace.queries.double(), q64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trace.keys.double(), k64, atol=1e-5, rtol=1e-5)
    scales = torch.tensor([llm.config.attn_scale(i) for i in range(llm.config.n_layer)], dtype=torch.float64)
    from_captured = float64_probs(trace.queries.double() * scales[:, None, None, None], trace.keys, 1.0)
    torch.testing.assert_close(trace.probs.double(), from_captured, atol=1e-5, rtol=0)
    torch.testing.assert_close(trace.probs.double(), p64, atol=1e-5, rtol=0)
    assert_peaked(trace.probs)


@pytest.mark.parametrize("backend, config, num_tokens", BACKENDS)
def test_rows_sum_to_one_and_the_future_is_exactly_zero(backend_llm, backend, config, num_tokens):
    trace = backend_llm(backend, config).attention(random_ids(num_tokens, config["vocab_size"], seed=1))
    torch.testing.assert_close(trace.probs.sum(-1), torch.ones(trace.probs.shape[:3]), atol=1e-5, rtol=0)
    assert torch.equal(trace.probs.triu(1), torch.zeros_like(trace.probs))
    visible = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()
    assert bool((trace.probs[..., visible] > 0).all()), "every visible key gets some weight"
    assert trace.queries is None and trace.keys is None


@pytest.mark.parametrize("backend, config, num_tokens", BACKENDS)
def test_capture_computes_what_the_normal_forward_computes(backend_llm, backend, config, num_tokens):
    """attention_with_probs' output is the backend's attention: the hidden rows are the plain forward's."""
    llm = backend_llm(backend, config)
    ids = random_ids(num_tokens, config["vocab_size"], seed=2)
    capture = AttentionCapture()
    torch.testing.assert_close(llm.engine.one_pass(ids, capture=capture), llm.engine.one_pass(ids),
                               atol=1e-5, rtol=1e-5)
    assert len(capture.probs) == config["n_layer"]


# ---- Hugging Face ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    model = hf_model(HF_ODD, seed=7)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(3.0)  # peaked rows
    folder = save_hf(model, tmp_path_factory.mktemp("hf_attention") / "model", "safetensors")
    model.set_attn_implementation("eager")  # the eager path is the one that returns attention weights
    return model, LLM(str(folder), device="cpu", block_size=16)


def test_probs_and_qk_equal_hf_output_attentions(hf_pair):
    model, llm = hf_pair
    ids = random_ids(41, HF_ODD["vocab_size"], seed=5)
    c_attn_out = []
    hooks = [block.attn.c_attn.register_forward_hook(lambda m, args, out: c_attn_out.append(out[0]))
             for block in model.transformer.h]
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        for hook in hooks:
            hook.remove()
    trace = llm.attention(ids, qk=True)
    hf_probs = torch.stack([a[0] for a in out.attentions])  # (L, H, T, T)
    torch.testing.assert_close(trace.probs, hf_probs, atol=1e-5, rtol=0)
    assert_peaked(trace.probs)
    heads = (len(ids), HF_ODD["n_head"], HF_ODD["n_embd"] // HF_ODD["n_head"])
    hf_q = torch.stack([qkv.split(HF_ODD["n_embd"], -1)[0].view(heads).transpose(0, 1) for qkv in c_attn_out])
    hf_k = torch.stack([qkv.split(HF_ODD["n_embd"], -1)[1].view(heads).transpose(0, 1) for qkv in c_attn_out])
    torch.testing.assert_close(trace.queries, hf_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trace.keys, hf_k, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 7, 777])
def test_next_tokens_are_the_top_k_of_hf_softmax(hf_pair, k):
    model, llm = hf_pair
    ids = random_ids(23, HF_ODD["vocab_size"], seed=k)
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([ids])).logits[0, -1].double(), dim=-1)  # (V,)
    expected_probs, expected_ids = torch.sort(probs, descending=True, stable=True)
    top = llm.next_tokens(ids, k=k)
    assert all(isinstance(t, NextToken) for t in top) and len(top) == k
    assert [t.id for t in top] == expected_ids[:k].tolist()
    torch.testing.assert_close(torch.tensor([t.prob for t in top], dtype=torch.float64), expected_probs[:k],
                               atol=1e-6, rtol=1e-5)
    assert [t.text for t in top] == [llm.tokenizer.decode([t.id]) for t in top]
    assert all(a.prob >= b.prob for a, b in zip(top, top[1:]))
    assert sum(t.prob for t in top) <= 1 + 1e-6


def test_next_tokens_ties_go_to_the_lower_id(llm):
    """A zero final LayerNorm makes every logit 0: all tokens tie, so the top-k is ids 0..k-1."""
    ln_f = llm.model.ln_f
    saved = ln_f.weight.detach().clone(), ln_f.bias.detach().clone()
    with torch.no_grad():
        ln_f.weight.zero_(), ln_f.bias.zero_()
    try:
        top = llm.next_tokens("Hello there", k=5)
    finally:
        with torch.no_grad():
            ln_f.weight.copy_(saved[0]), ln_f.bias.copy_(saved[1])
    assert [t.id for t in top] == [0, 1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor([t.prob for t in top]), torch.full((5,), 1 / 50257))


# ---- tokens, inputs, state ---------------------------------------------------------------------------


def test_tokens_are_the_bpe_pieces_as_text(llm):
    text = "The dog on the ship ran 🦜"
    trace = llm.attention(text)
    assert trace.token_ids == llm.tokenizer.encode(text)
    assert trace.tokens == [llm.tokenizer.decode([i]) for i in trace.token_ids]
    assert trace.tokens[:3] == ["The", " dog", " on"]
    assert trace.tokens[-3:] == [" \ufffd", "\ufffd", "\ufffd"], "the parrot's 4 bytes in 3 pieces, none whole UTF-8"
    assert trace.model.startswith("random:")


def test_text_and_ids_give_the_same_trace(llm):
    text = "a list: one, two, three"
    by_text, by_ids = llm.attention(text), llm.attention(llm.tokenizer.encode(text))
    assert by_text.tokens == by_ids.tokens
    assert torch.equal(by_text.probs, by_ids.probs)


TOO_LONG = list(range(TINY["n_positions"] + 1))
BAD_INPUTS = [
    ("attention", ("",), {}, "text is empty"),
    ("attention", ([],), {}, "empty"),
    ("next_tokens", ("",), {}, "text is empty"),
    ("attention", (TOO_LONG,), {}, "context is 48"),
    ("next_tokens", ("word " * 60,), {}, "context is 48"),
    ("attention", ([3, 50257],), {}, "token id 50257 is outside the model's vocabulary"),
    ("next_tokens", ([-1],), {}, "token id -1 is outside"),
    ("attention", (5,), {}, "a prompt must be a string or a list of token ids"),
    ("attention", ([1.5],), {}, "a prompt must be a string or a list of token ids"),
    ("attention", ("hi",), {"qk": "yes"}, "qk must be True or False"),
    ("next_tokens", ("hi",), {"k": 0}, "k must be an integer from 1"),
    ("next_tokens", ("hi",), {"k": 50258}, "k must be an integer from 1 to the vocabulary size 50257"),
    ("next_tokens", ("hi",), {"k": 2.0}, "k must be an integer"),
    ("next_tokens", ("hi",), {"k": True}, "k must be an integer"),
]


@pytest.mark.parametrize("method, args, kwargs, message", BAD_INPUTS)
def test_bad_inputs_raise_value_error_naming_the_problem(llm, method, args, kwargs, message):
    free = llm.engine.pool.num_free
    with pytest.raises(ValueError, match=message):
        getattr(llm, method)(*args, **kwargs)
    assert llm.engine.pool.num_free == free


def test_full_context_is_accepted(llm):
    trace = llm.attention(TOO_LONG[:-1])
    assert trace.probs.shape[-1] == TINY["n_positions"]


def test_capture_leaves_no_state_behind():
    """Generation is the same before and after attention()/next_tokens(), and every block is free again."""
    llm = random_llm(TINY)
    pool = llm.engine.pool
    prompts = [random_ids(n, TINY["vocab_size"], seed=n) for n in (5, 19)]
    params = SamplingParams(max_tokens=6, temperature=0)
    before = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    free = pool.num_free
    llm.attention(prompts[1], qk=True)
    llm.next_tokens(prompts[0], k=3)
    assert pool.num_free == free == pool.num_blocks
    pool.check(tables=[])
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == before
    fresh = random_llm(TINY)
    assert [o.outputs[0].token_ids for o in fresh.generate(prompts, params)] == before


def test_trace_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="2 token texts for 1 token ids"):
        AttentionTrace(["a", "b"], [64], torch.ones(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"probs must be \(n_layer, n_head, 2, 2\)"):
        AttentionTrace(["a", "b"], [64, 65], torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="queries must be"):
        AttentionTrace(["a"], [64], torch.ones(1, 1, 1, 1), queries=torch.ones(2, 1, 1, 4))


# ---- views (gpt2fast.viz, part B of issue 7) ---------------------------------------------------------


def test_html_and_notebook_views(llm, tmp_path):
    trace = llm.attention('<script>alert("x")</script> and "quotes"', qk=True)
    page = trace.to_html()
    assert page.lstrip().lower().startswith("<!doctype html")
    assert "<script>alert" not in page, "token text is data, never markup"
    saved = trace.save_html(tmp_path / "attention.html", view="head").read_text(encoding="utf-8")
    assert saved.lstrip().lower().startswith("<!doctype html") and "<script>alert" not in saved
    fragment = trace._repr_html_()
    assert "<html" not in fragment.lower() and "<script>alert" not in fragment
