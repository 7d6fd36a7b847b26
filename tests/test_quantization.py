"""Int8 weight-only quantization: ``quantize_int8`` against float64 numpy, every op given an ``Int8Weight``
against the same op given the dequantized weight, a whole model against the reference on dequantized
weights, and the refusals (bad values, backends without int8 kernels, each command's flag)."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch

from gpt2fast import cli
from gpt2fast.checkpoint import load_checkpoint
from gpt2fast.config import GPT2Config
from gpt2fast.engine import LLM, Engine
from gpt2fast.model import GPT2, op_weight
from gpt2fast.ops import REFERENCE, TORCH, check_quantization_support, cpu, get_ops, reference, torch_native
from gpt2fast.quant import Int8Weight, check_quantization, quantize_int8, to_panels
from gpt2fast.sampling import SamplingParams
from gpt2fast.server import serve
from gpt2fast.viz import cli as viz_cli
from gpt2fast.viz import explore

WEIGHT_SHAPES = [(1, 1), (3, 17), (111, 23), (97, 40), (600, 4097)]  # the last spans several quantize chunks
OP_SHAPES = [(1, 1), (5, 3), (97, 40), (111, 67)]  # (N, K)
ROWS = [1, 3, 17]
BACKENDS = {"reference": REFERENCE, "torch": TORCH}
# The torch backend's int8 GEMM scales after the matmul ((q @ x.T) * s, not x @ (q * s).T): fp32 rounding apart.
TOLERANCE = {"reference": dict(rtol=0, atol=0), "torch": dict(rtol=1e-5, atol=1e-5)}
TINY = {"n_layer": 3, "n_embd": 40, "n_head": 5, "vocab_size": 97, "n_positions": 64}
TINY_MODEL = "random:" + json.dumps(TINY)


def numpy_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The contract in float64: scale = max|row| / 127 (1 for a zero row), q = round-half-even(w / scale)."""
    amax = np.abs(w).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    return np.clip(np.round(w / scale[:, None]), -127, 127), scale


@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
def test_quantize_int8_matches_float64_numpy(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])) * 0.3
    w[shape[0] // 2] = 0.0  # a zero row: scale 1, every q 0
    got = quantize_int8(w)
    q, scale = numpy_int8(w.double().numpy())
    assert got.q.dtype == torch.int8 and got.scale.dtype == torch.float32 and got.shape == w.shape
    np.testing.assert_allclose(got.scale.numpy(), scale, rtol=2e-7)
    assert got.scale[shape[0] // 2] == 1.0 and not got.q[shape[0] // 2].any()
    ratio = w.double().numpy() / scale[:, None]
    near_tie = np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4  # fp32 vs fp64 division may round either way
    mismatch = got.q.numpy() != q
    assert not (mismatch & ~near_tie).any() and (np.abs(got.q.numpy() - q) <= 1).all()
    assert got.q.abs().max() <= 127 and (got.q.abs().amax(dim=1) == 127).sum() == shape[0] - 1


def test_quantize_int8_rounds_half_to_even_and_reads_any_layout():
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5]])  # scale 1: the ratios are the values
    assert quantize_int8(w).q.tolist() == [[127, 0, 2, 2, 0, -2]]
    base = torch.randn(40, 23)
    expected = quantize_int8(base.t().contiguous())
    for layout in (base.t(), base.t().to(torch.float64)):  # non-contiguous; another float dtype
        got = quantize_int8(layout)
        assert torch.equal(got.q, expected.q) and torch.equal(got.scale, expected.scale)


@pytest.mark.parametrize("bad", [torch.randn(3), torch.randn(2, 3, 4), torch.tensor(1.0)])
def test_quantize_int8_refuses_a_weight_that_is_not_2d(bad):
    with pytest.raises(ValueError, match=re.escape(f"must be 2-D (N, K), got shape {tuple(bad.shape)}")):
        quantize_int8(bad)


def weights(n: int, k: int, seed: int) -> tuple[Int8Weight, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    int8 = quantize_int8(torch.randn(n, k, generator=gen) * 0.1)
    return int8, int8.dequantize()


@pytest.fixture(params=[None, 64], ids=["chunk-1MB", "chunk-64B"])
def chunk_bytes(request, monkeypatch):
    """The torch backend's int8 GEMM with its real chunk and with one that cuts every weight into many."""
    if request.param is not None:
        monkeypatch.setattr(torch_native, "INT8_CHUNK_BYTES", request.param)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("nk", OP_SHAPES)
def test_linear_ops_on_int8_equal_the_ops_on_the_dequantized_weight(backend, rows, nk, chunk_bytes):
    ops, (n, k) = BACKENDS[backend], nk
    int8, dense = weights(n, k, seed=rows + n)
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(k, rows, generator=gen).t()  # (T, K), non-contiguous
    bias, residual = torch.randn(n, generator=gen), torch.randn(rows, n, generator=gen)
    ln_w, ln_b = torch.rand(k, generator=gen) + 0.5, torch.randn(k, generator=gen)
    tol = TOLERANCE[backend]
    for kwargs in ({}, {"gelu": True}, {"residual": residual}):
        for b in (bias, None):
            torch.testing.assert_close(ops.linear(x, int8, b, **kwargs), reference.linear(x, dense, b, **kwargs), **tol)
    got = ops.ln_linear(x, ln_w, ln_b, 1e-5, int8, bias, gelu=True)
    torch.testing.assert_close(got, reference.ln_linear(x, ln_w, ln_b, 1e-5, dense, bias, gelu=True), **tol)
    half = ops.linear(x.to(torch.bfloat16), int8, bias)  # other activation dtypes: the reference's path
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half, reference.linear(x.to(torch.bfloat16), dense, bias))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("vocab", [1, 5, 97, 111])
def test_embedding_and_lm_heads_on_int8_equal_the_ops_on_the_dequantized_table(backend, rows, vocab, chunk_bytes):
    ops, width = BACKENDS[backend], 40
    int8, dense = weights(vocab, width, seed=vocab + rows)
    gen = torch.Generator().manual_seed(rows)
    ids, positions = torch.randint(0, vocab, (rows,), generator=gen), torch.arange(rows)
    wpe = torch.randn(rows, width, generator=gen)
    assert torch.equal(ops.embed(ids, positions, int8, wpe), reference.embed(ids, positions, dense, wpe))
    assert ops.embed(ids, positions, int8, wpe.to(torch.float16)).dtype == torch.float16  # wpe's: the model dtype
    x = torch.randn(width, rows, generator=gen).t()  # (N, C), non-contiguous
    logits = reference.lm_head(x, dense)
    torch.testing.assert_close(ops.lm_head(x, int8), logits, **TOLERANCE[backend])
    assert torch.equal(ops.lm_head_argmax(x, int8), reference.lm_head_argmax(x, dense))
    temperature = torch.tensor([0.0, 0.8, 1.3] * rows)[:rows]
    seeds = torch.arange(rows, dtype=torch.int64) * 7919 + 3
    got = ops.lm_head_gumbel(x, int8, temperature, seeds)
    assert torch.equal(got, reference.lm_head_gumbel(x, dense, temperature, seeds))


def test_the_model_holds_int8_buffers_and_loading_frees_the_float_state():
    cfg = GPT2Config(**TINY)
    state = GPT2(cfg).init_random(seed=1).state_dict()
    expected = {name: t.clone() for name, t in state.items()}
    model = GPT2.from_state_dict(cfg, state, quantization="int8")
    assert state == {}, "every float tensor is dropped once read"
    held = model.state_dict()
    for name in ("wte", "h.0.attn.c_attn", "h.2.mlp.c_proj"):
        int8 = quantize_int8(expected[name + ".weight"])
        assert torch.equal(held[name + ".weight"], int8.q) and torch.equal(held[name + ".weight_scale"], int8.scale)
    assert {held[n].dtype for n in ("wpe.weight", "h.1.ln_2.bias", "h.1.attn.c_proj.bias")} == {torch.float32}
    assert isinstance(op_weight(model.h[1].mlp.c_fc), Int8Weight) and isinstance(model.wte_weight, Int8Weight)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # int8 weights are buffers
    dense = model.dense_state_dict()
    assert dense.keys() == expected.keys()
    assert torch.equal(dense["h.0.mlp.c_fc.weight"], quantize_int8(expected["h.0.mlp.c_fc.weight"]).dequantize())
    fp16 = GPT2.from_state_dict(cfg, dict(expected), dtype=torch.float16, quantization="int8")
    assert fp16.wpe.weight.dtype == torch.float16 and fp16.wte.weight_scale.dtype == torch.float32
    with pytest.raises(ValueError, match="init_random fills float weights"):
        model.init_random()


@pytest.mark.parametrize("n, k", [(1, 4), (16, 8), (17, 12), (97, 40), (301, 72)])
def test_panels_hold_the_same_values(n, k, monkeypatch):
    """quant.to_panels against a plain index loop: element [p, g, c, j] is q[16 p + c, 4 g + j], zero past N."""
    gen = torch.Generator().manual_seed(n * k)
    int8 = quantize_int8(torch.randn(n, k, generator=gen))
    panels = to_panels(int8.q)
    expected = np.zeros(((n + 15) // 16, k // 4, 16, 4), dtype=np.int8)
    q = int8.q.numpy()
    for row in range(n):
        for col in range(k):
            expected[row // 16, col // 4, row % 16, col % 4] = q[row, col]
    assert np.array_equal(panels.numpy(), expected)
    w = Int8Weight(panels, int8.scale)
    assert w.panels and not int8.panels and w.shape == int8.shape == (n, k) and torch.equal(w.q, int8.q)
    ids = torch.randint(-n, n, (9,), generator=gen)  # negative ids count from the end, as indexing does
    assert torch.equal(w.rows(ids), int8.rows(ids)) and torch.equal(w.dequantize(), int8.dequantize())
    assert torch.equal(w.rows(ids.reshape(3, 3)), int8.rows(ids.reshape(3, 3)))  # (3, 3, K)
    x = torch.randn(3, k, generator=gen)
    monkeypatch.setattr(torch_native, "INT8_CHUNK_BYTES", 4 * k * 5)  # chunks of 5 rows: 16 (whole panels) here
    torch.testing.assert_close(torch_native.int8_matmul(w, x), torch_native.int8_matmul(int8, x), atol=1e-5, rtol=1e-5)
    for bad in (n, -n - 1):  # (a row of the last panel's padding is no row)
        for weight in (w, int8):
            with pytest.raises(IndexError):
                weight.rows(torch.tensor([0, bad]))


def test_panels_need_k_a_multiple_of_4():
    with pytest.raises(ValueError, match="K a multiple of 4, got K=6"):
        to_panels(torch.zeros(3, 6, dtype=torch.int8))


@pytest.mark.parametrize("huge_pages", ["1", "0"])
def test_cpu_models_hold_int8_panels_where_the_kernels_use_vnni(monkeypatch, huge_pages):
    """The cpu backend's VNNI kernels stream panels: a model built for it holds them (in the arena or not), and
    every way of reading the weights sees the (N, K) values a torch-backend model holds."""
    monkeypatch.setenv("GPT2FAST_HUGE_PAGES", huge_pages)
    cfg = GPT2Config(**TINY)
    state = GPT2(cfg).init_random(seed=4).state_dict()
    rows = GPT2.from_state_dict(cfg, dict(state), ops=TORCH, quantization="int8")
    model = GPT2.from_state_dict(cfg, dict(state), ops=get_ops("cpu", torch.device("cpu")), quantization="int8")
    vnni = cpu.int8_method() == "vnni"
    assert model.int8_panels == vnni and not rows.int8_panels
    assert tuple(model.wte.weight.shape) == ((7, 10, 16, 4) if vnni else (97, 40))  # 97 = 6 panels + 1 channel
    assert tuple(model.h[0].mlp.c_proj.weight.shape) == ((3, 40, 16, 4) if vnni else (40, 160))
    for name in model.quantized_modules():
        got, want = op_weight(model.get_submodule(name)), op_weight(rows.get_submodule(name))
        assert got.panels == vnni and torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale), name
    ids = torch.tensor([96, 0, 5, 16, 17])
    assert torch.equal(model.wte_weight.rows(ids), rows.wte_weight.rows(ids))
    dense, want = model.dense_state_dict(), rows.dense_state_dict()
    assert dense.keys() == want.keys() and all(torch.equal(dense[n], want[n]) for n in want)
    cpu_ops = get_ops("cpu", torch.device("cpu"))
    for other in (dict(TINY, n_embd=42, n_head=6), TINY):  # K not a multiple of 4; fp16 runs the torch backend's ops
        dtype = torch.float16 if other is TINY else torch.float32
        c = GPT2Config(**other)
        m = GPT2.from_state_dict(c, GPT2(c).init_random(seed=1).state_dict(), ops=cpu_ops, dtype=dtype,
                                 quantization="int8")
        assert not m.int8_panels and m.wte.weight.dim() == 2


HF_TINY = {"n_layer": 2, "n_embd": 24, "n_head": 3, "vocab_size": 50257, "n_positions": 32}


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_every_source_quantizes_to_what_its_float_weights_quantize_to(hf_folder, fmt):
    """random: weights are quantized as drawn, folders as read (transposed Conv1D weights straight from views)."""
    _, folder = hf_folder(HF_TINY, fmt=fmt)
    for source in (str(folder), TINY_MODEL):
        fp32, int8 = Engine(source).model, Engine(source, quantization="int8").model
        for name, module in fp32.quantized_modules().items():
            expected = quantize_int8(module.weight)
            assert torch.equal(op_weight(int8.get_submodule(name)).q, expected.q), (source, name)
            assert torch.equal(op_weight(int8.get_submodule(name)).scale, expected.scale), (source, name)
            assert module.weight.is_contiguous()  # the float model copies the transposed views
        assert torch.equal(int8.h[0].attn.c_attn.bias, fp32.h[0].attn.c_attn.bias)
    checkpoint = load_checkpoint(TINY_MODEL, quantization="int8")
    assert isinstance(checkpoint.state_dict["h.1.mlp.c_fc.weight"], Int8Weight)
    with pytest.raises(ValueError, match="wte.weight arrives as int8 weights"):
        GPT2.from_state_dict(checkpoint.config, checkpoint.state_dict)


def reference_on_dequantized(llm: LLM) -> LLM:
    """A float LLM on the reference backend holding ``llm``'s int8 weights dequantized."""
    ref = LLM(TINY_MODEL, backend="reference")
    ref.model.load_state_dict(llm.model.dense_state_dict(), strict=True)
    return ref


def logit_tolerance(backend: str) -> float:
    """1e-4, except the cpu backend's VNNI path, which quantizes activations per row too: each linear is then
    within half a step of its rows times sum|w| (tests/test_cpu_ops.py); through 3 layers and the LM head that
    measured 2.7e-3 on logits of size 0.4, so 1e-2 (AVX2 and portable dequantize in registers: 1e-4)."""
    return 1e-2 if backend == "cpu" and cpu.int8_method() == "vnni" else 1e-4


@pytest.mark.parametrize("backend", ["torch", "reference", "cpu"])
def test_int8_logits_equal_the_reference_on_the_dequantized_weights(backend):
    llm = LLM(TINY_MODEL, backend=backend, quantization="int8")
    assert llm.quantization == "int8" and llm.model.wte.weight.dtype == torch.int8
    ids = [5, 90, 3, 3, 41, 17, 0, 96, 12, 60, 61, 2, 33]
    got = llm.logits(ids)
    torch.testing.assert_close(got, reference_on_dequantized(llm).logits(ids), rtol=0, atol=logit_tolerance(backend))
    assert (got - LLM(TINY_MODEL, backend=backend).logits(ids)).abs().max() > 1e-4, "int8 is not the fp32 model"


def test_attention_inspection_and_next_tokens_run_on_int8():
    llm = LLM(TINY_MODEL, backend="torch", quantization="int8")
    ref = reference_on_dequantized(llm)
    ids = [3, 14, 15, 92, 65, 35]
    trace, expected = llm.attention(ids, qk=True), ref.attention(ids, qk=True)
    torch.testing.assert_close(trace.probs, expected.probs, rtol=0, atol=1e-5)
    torch.testing.assert_close(trace.queries, expected.queries, rtol=0, atol=1e-4)
    got, want = llm.next_tokens(ids, k=5), ref.next_tokens(ids, k=5)
    assert [t.id for t in got] == [t.id for t in want]
    assert max(abs(a.prob - b.prob) for a, b in zip(got, want)) < 1e-5


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["dynamic", "decode-runner"])
def test_int8_greedy_generation_equals_the_reference(backend, cuda_graphs):
    """On the cpu backend decode steps run every layer in one native call (DecodeLayers) over the Int8Weights."""
    prompts = [[1, 2, 3], [40, 41], [7] * 11]
    params = SamplingParams(max_tokens=12, temperature=0)
    runs = [LLM(TINY_MODEL, backend=b, quantization="int8", cuda_graphs=cuda_graphs).generate(prompts, params)
            for b in (backend, "reference")]
    tokens = [[out.outputs[0].token_ids for out in run] for run in runs]
    assert tokens[0] == tokens[1] and all(len(t) == 12 for t in tokens[0])
    seeded = SamplingParams(max_tokens=8, temperature=0.9, seed=11)  # sampled rows: lm_head_gumbel / the sampler
    drawn = [LLM(TINY_MODEL, backend=b, quantization="int8", cuda_graphs=cuda_graphs).generate(prompts, seeded)
             for b in (backend, "reference")]
    assert [o.outputs[0].token_ids for o in drawn[0]] == [o.outputs[0].token_ids for o in drawn[1]]


@pytest.mark.parametrize("bad", ["int4", "INT8", "fp8", ""])
def test_a_bad_quantization_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match=f"unknown quantization {bad!r}"):
        LLM(TINY_MODEL, quantization=bad)
    with pytest.raises(ValueError, match=f"unknown quantization {bad!r}"):
        GPT2(GPT2Config(**TINY), quantization=bad)
    assert check_quantization("none") is None and check_quantization("int8") == "int8"


def test_backends_without_int8_kernels_refuse_it_at_construction(monkeypatch):
    """Every backend has int8 kernels today; one without them (a table with no quantizations) refuses int8 weights
    before anything is loaded."""
    floats_only = dataclasses.replace(TORCH, name="floats", quantizations=())
    with pytest.raises(ValueError, match=r"backend 'floats' has no int8 kernels \(it takes float weights\)"):
        check_quantization_support(floats_only, "int8")
    monkeypatch.setattr("gpt2fast.engine.get_ops", lambda name, device: floats_only)
    monkeypatch.setattr("gpt2fast.engine.load_checkpoint", lambda *a, **k: pytest.fail("weights loaded first"))
    with pytest.raises(ValueError, match="backend 'floats' has no int8"):
        Engine(TINY_MODEL, quantization="int8")
    check_quantization_support(floats_only, None)  # float weights: any backend


PARSERS = {
    "generate": lambda args: cli.build_parser().parse_args(["generate", *args]),
    "serve": serve.build_parser().parse_args,
    "attention": lambda args: viz_cli.build_parser().parse_args([*args, "--text", "hi"]),
    "explore": explore.build_parser().parse_args,
}


@pytest.mark.parametrize("command", PARSERS)
def test_every_command_takes_quantization_and_names_a_bad_value(command, capsys):
    parse = PARSERS[command]
    assert parse(["--model", "m"]).quantization == "none"
    assert parse(["--model", "m", "--quantization", "int8"]).quantization == "int8"
    with pytest.raises(SystemExit) as exit_info:
        parse(["--model", "m", "--quantization", "int4"])
    assert exit_info.value.code == 2
    assert "--quantization: invalid choice: 'int4'" in capsys.readouterr().err


def test_generate_runs_int8_and_refuses_it_on_a_backend_without_int8_kernels_before_loading(capsys, monkeypatch):
    assert cli.main(["generate", "--model", TINY_MODEL, "--prompt", "a", "--length", "3", "--temperature", "0",
                     "--quantization", "int8"]) == 0
    floats_only = dataclasses.replace(TORCH, name="floats", quantizations=())  # no backend of ours is one
    monkeypatch.setattr("gpt2fast.ops.get_ops", lambda name, device: floats_only)
    assert cli.main(["generate", "--model", "/no/such/folder", "--prompt", "a", "--device", "cpu",
                     "--backend", "triton", "--quantization", "int8"]) == 2
    assert "backend 'floats' has no int8 kernels" in capsys.readouterr().err


def test_the_server_reports_and_serves_int8():
    from fastapi.testclient import TestClient

    from gpt2fast.server import make_app

    engine = Engine(TINY_MODEL, device="cpu", quantization="int8", max_num_seqs=2)
    expected = LLM(TINY_MODEL, quantization="int8").generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0))
    with TestClient(make_app(engine, model_name="tiny")) as c:
        assert [m["quantization"] for m in c.get("/v1/models").json()["data"]] == ["int8"]
        reply = c.post("/v1/completions", json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4,
                                                "temperature": 0, "logprobs": 1}).json()
    assert reply["choices"][0]["text"] == expected[0].outputs[0].text
    with TestClient(make_app(Engine(TINY_MODEL, device="cpu", max_num_seqs=2), model_name="tiny")) as c:
        assert c.get("/v1/models/tiny").json()["quantization"] is None
