"""The napkin math against independent counts: the model's parameters, the KV cache size, the prefill's FLOPs."""

from __future__ import annotations

import pytest

from gpt2fast.config import PRESETS
from gpt2fast.roofline import (
    BACKEND_LAUNCHES,
    DRAM_TRIP_S,
    H100_BANDWIDTH,
    H100_FP16_FLOPS,
    LAUNCH_GAP_S,
    PDL_LAUNCHES,
    decode_step,
    floor_table,
    op_bytes,
    predict_step,
    prefill_step,
    prefill_table,
    step_time,
)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl"])
def test_a_batch_of_one_reads_every_weight_once_plus_the_kv_cache(name):
    """At batch 1 a step moves the weights (all but the position table) and K/V of the context, plus a
    sliver of activations; the fp16 124M floor is the brief's ~74 us."""
    cfg, context = PRESETS[name], 300
    total = sum(k.calls * k.dram_bytes for k in decode_step(cfg, batch=1, context=context))
    weights = 2 * (cfg.num_params() - cfg.n_positions * cfg.n_embd)
    kv = 2 * cfg.n_layer * 2 * context * cfg.n_embd
    assert weights + kv <= total < (weights + kv) * 1.005
    if name == "gpt2":
        assert 73e-6 < weights / H100_BANDWIDTH < 75e-6


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("batch", [1, 8])
def test_int8_weights_save_a_byte_per_matrix_element_less_a_scale_per_row(name, batch):
    """W8A16: every matrix element (the tied wte read by the LM head, the batch's wte rows by the embedding, the four
    linears of each layer) costs 1 byte instead of 2, plus 4 per output row; nothing else changes. At batch 1 the
    floor of every preset halves, to within the KV cache, activations and scales."""
    cfg = PRESETS[name]
    c, f, v, layers = cfg.n_embd, cfg.mlp_width, cfg.vocab_size, cfg.n_layer
    mats = v * c + batch * c + layers * (3 * c * c + c * c + c * f + f * c)
    rows = v + batch + layers * (3 * c + c + f + c)
    fp16, int8 = (sum(k.calls * k.dram_bytes for k in decode_step(cfg, batch, 128, quantization=q))
                  for q in (None, "int8"))
    assert fp16 - int8 == mats - 4 * rows
    if batch == 1:
        assert 0.5 < int8 / fp16 < 0.52
        assert floor_table(1, 128).count(f"| {name} |") == 1


def test_activations_and_kv_grow_with_the_batch_and_the_weights_do_not():
    cfg = PRESETS["gpt2"]
    one, many = (sum(k.calls * k.dram_bytes for k in decode_step(cfg, b, 128)) for b in (1, 64))
    kv_and_acts = many - one
    assert 63 * 2 * cfg.n_layer * 2 * 128 * cfg.n_embd < kv_and_acts < 63 * 2 * cfg.n_layer * 2 * 160 * cfg.n_embd


def test_fused_choice_saves_the_logits_and_the_time_adds_up():
    cfg = PRESETS["gpt2"]
    fused, plain = decode_step(cfg, 8, 64), decode_step(cfg, 8, 64, fused_choice=False)
    saved = sum(k.calls * k.dram_bytes for k in plain) - sum(k.calls * k.dram_bytes for k in fused)
    assert saved > 8 * cfg.vocab_size * 4 * 0.95  # the (B, V) fp32 logits no longer written
    assert step_time(fused) == pytest.approx(sum(k.calls * k.dram_bytes for k in fused) / H100_BANDWIDTH)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-xl"])
def test_launches_per_step_are_the_measured_triton_counts(name):
    """5 per layer + 3, the counts tests/test_launches.py measures on the interpreter (decode_launches)."""
    cfg = PRESETS[name]
    assert sum(k.calls * k.launches for k in decode_step(cfg, 4, 128)) == 5 * cfg.n_layer + 3


def test_ln_linear_statistics_rereads_stay_in_l2_and_grow_with_the_batch():
    """The LayerNorm prologue re-reads x per split program from L2: extra L2 bytes, never DRAM bytes."""
    cfg = PRESETS["gpt2"]
    qkv = {b: next(k for k in decode_step(cfg, b, 128) if k.name.startswith("ln_1")) for b in (1, 64)}
    assert qkv[64].dram_bytes - qkv[1].dram_bytes == 2 * 63 * (cfg.n_embd + 3 * cfg.n_embd)  # x in, y out
    assert qkv[64].workspace_bytes > 32 * qkv[1].workspace_bytes > 0


def test_op_bytes_holds_the_step_and_the_unfused_ops_the_benchmarks_time():
    """The fused kernels move the unfused linear's bytes plus the LayerNorm's weight and bias (ln_linear) or
    the residual (the projections); add_layer_norm moves x, residual in and out, y and the LN parameters."""
    cfg, b = PRESETS["gpt2"], 8
    ops, c = op_bytes(cfg, b, 64), cfg.n_embd
    assert all(ops[k.name] == k for k in decode_step(cfg, b, 64))
    assert ops["ln_1 + linear qkv"].dram_bytes == ops["linear qkv"].dram_bytes + 2 * 2 * c
    assert ops["ln_2 + linear fc + gelu"].dram_bytes == ops["linear fc + gelu"].dram_bytes + 2 * 2 * c
    assert ops["linear mlp proj + residual"].dram_bytes == ops["linear mlp proj"].dram_bytes + 2 * b * c
    assert ops["add_layer_norm"].dram_bytes == 2 * (4 * b * c + 2 * c)


@pytest.mark.parametrize("batch, context", [(1, 128), (8, 64), (64, 1024)])
def test_fused_write_kv_attention_moves_both_ops_bytes_less_the_newest_kv_read_back(batch, context):
    """The fused decode attention moves what write_kv and attention move on their own, less the newest position's
    K and V, which it takes from its registers instead of reading back from the pages; one launch for both."""
    cfg = PRESETS["gpt2"]
    ops = op_bytes(cfg, batch, context)
    fused = ops["write_kv + attention decode"]
    newest_kv = 2 * 2 * batch * cfg.n_embd  # fp16 K and V of one position per sequence
    assert fused.dram_bytes == ops["write_kv"].dram_bytes + ops["attention decode"].dram_bytes - newest_kv
    assert fused.launches == 1 and fused.workspace_bytes == ops["attention decode"].workspace_bytes
    assert "write_kv" not in [k.name for k in decode_step(cfg, batch, context)]


@pytest.mark.parametrize("batch", [1, 64])
def test_predictions_add_their_terms_and_every_launch_mode_saves_over_the_last(batch):
    """The latency model (a prediction, not a measurement): the bandwidth term is step_time; eager > graph >=
    graph + PDL, which saves the gaps of the kernels launched with PDL today (none in cuda yet) and the DRAM trip
    of the weights each fetches before its wait."""
    cfg = PRESETS["gpt2"]
    for backend in BACKEND_LAUNCHES:
        eager, graph, pdl = (predict_step(cfg, backend, mode, batch, 128) for mode in ("eager", "graph", "graph+pdl"))
        assert eager.bandwidth_s == graph.bandwidth_s == step_time(decode_step(cfg, batch, 128))
        assert eager.total_s > graph.total_s >= pdl.total_s > pdl.bandwidth_s
        per_layer, fixed = PDL_LAUNCHES[backend]  # launched with PDL today: their gaps shrink, one trip each hidden
        launched = per_layer * cfg.n_layer + fixed
        saved = launched * (LAUNCH_GAP_S["graph"] - LAUNCH_GAP_S["graph+pdl"] + DRAM_TRIP_S)
        assert graph.total_s - pdl.total_s == pytest.approx(saved)
        assert graph.latency_s - pdl.latency_s == pytest.approx(launched * DRAM_TRIP_S)
        assert graph.total_s == pytest.approx(graph.bandwidth_s + graph.latency_s + graph.launch_s)
        per_layer, fixed = BACKEND_LAUNCHES[backend]
        assert graph.launch_s == pytest.approx((per_layer * cfg.n_layer + fixed) * LAUNCH_GAP_S["graph"])
    triton, cuda = (predict_step(cfg, b, "graph", batch, 128) for b in ("triton", "cuda"))
    assert cuda.total_s == pytest.approx(triton.total_s)  # as many launches, 5 per layer + 3
    triton, cuda = (predict_step(cfg, b, "graph+pdl", batch, 128) for b in ("triton", "cuda"))
    assert cuda.total_s > triton.total_s and cuda.latency_s > triton.latency_s  # no PDL in cuda yet
    assert predict_step(cfg, "triton", "eager", batch, 128).dominant == "launches"


def test_predictions_refuse_an_unknown_mode_or_backend():
    with pytest.raises(ValueError, match="unknown launch mode 'graphs'"):
        predict_step(PRESETS["gpt2"], "triton", "graphs", 1, 16)
    with pytest.raises(ValueError, match="no launch count for backend 'torch'"):
        predict_step(PRESETS["gpt2"], "torch", "graph", 1, 16)


# ---- prefill: FLOPs, bytes, arithmetic intensity ---------------------------------------------------------------


def test_prefill_flops_are_the_model_multiply_adds():
    """The prefill's FLOPs against a count from the weight shapes: 2 per multiply-add of every linear over every
    token, plus the causal attention's Q K^T and P V over the lower triangle (positions 0..P-1 see 1..P keys)."""
    cfg, batch, prompt = PRESETS["gpt2"], 2, 300
    step = {k.name: k for k in prefill_step(cfg, batch, prompt)}
    c, tokens = cfg.n_embd, batch * prompt
    linears = 2 * tokens * (c * 3 * c + c * c + 2 * c * cfg.mlp_width) * cfg.n_layer
    assert sum(step[n].calls * step[n].flops for n in step if n.startswith("linear")) == linears
    keys_seen = sum(range(1, prompt + 1))  # per sequence and head
    attention = 2 * 2 * keys_seen * cfg.head_dim * cfg.n_head * batch
    assert step["write_kv + attention prefill"].flops == attention
    assert step["lm_head + choice"].flops == 2 * batch * c * cfg.vocab_size  # the last row of each prompt only


def test_prefill_gemms_cross_from_memory_to_compute_bound_with_the_prompt():
    """A GEMM's intensity grows with the rows (the weight is read once however many): memory-bound for short
    prompts, compute-bound past the H100's ridge (~295 FLOP/byte) for long ones; LayerNorm never leaves memory."""
    ridge = H100_FP16_FLOPS / H100_BANDWIDTH
    short = {k.name: k for k in prefill_step(PRESETS["gpt2"], 1, 64)}
    long = {k.name: k for k in prefill_step(PRESETS["gpt2"], 1, 4096)}
    assert short["linear fc + gelu"].bound() == "memory" and short["linear fc + gelu"].intensity < ridge
    assert long["linear fc + gelu"].bound() == "compute" and long["linear fc + gelu"].intensity > ridge
    assert long["layer_norm"].bound() == "memory"
    k = long["linear qkv"]
    assert k.seconds() == pytest.approx(k.flops / H100_FP16_FLOPS)
    table = prefill_table(PRESETS["gpt2"], 1, 4096)
    assert "| linear qkv | 12 |" in table and "compute" in table and "**step** (87 launches)" in table
