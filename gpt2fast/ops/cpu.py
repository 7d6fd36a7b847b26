"""The ``cpu`` backend: typed wrappers over the native CPU kernels ``gpt2fast._cpu`` (``csrc/cpu/``).

Same signatures as ``ops/reference.py``. The kernels take raw pointers; these wrappers check every tensor
(device, dtype, shape, strides), allocate the outputs and pass ``data_ptr()``s. Weights are used as they
lie (``(N, K)`` row-major: fp32, bf16, or ``quant.Int8Weight``, whose values a model built for this backend
holds in panels where the kernels use VNNI: ``int8_panels``); activations are fp32 or bf16 (the model dtype).
What runs natively: ``linear`` / ``ln_linear`` (LayerNorm prologue; bias, GELU, residual epilogues),
decode ``write_kv_attention`` (one query per sequence), and the LM head with logits, argmax or Gumbel-max
(the sampler's Philox noise, so a seeded draw matches every backend's). Prefill attention and the small
ops are the ``torch`` backend's. Threads: ``torch.get_num_threads()`` at each call (``--cpu-threads``
sets it). The instruction set (AVX-512 with VNNI/BF16, AVX2, portable) is picked by cpuid at import;
``GPT2FAST_CPU_ISA=avx2`` (or ``portable``) forces a lesser one. Design and measurements: ``benchmarks/cpu_kernels.md``.

Example:
    >>> x, w, b = torch.randn(3, 40), torch.randn(7, 40), torch.randn(7)
    >>> torch.allclose(linear(x, w, b, gelu=True), reference.linear(x, w, b, gelu=True), atol=1e-5)
    True
"""

from __future__ import annotations

import os

import torch

from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import reference, torch_native
from gpt2fast.quant import Int8Weight, panel_shape
from gpt2fast.sampling import GREEDY_BELOW

try:
    if os.environ.get("GPT2FAST_CPU_SANITIZE") == "1":  # the ASan+UBSan build (tests; gpt2fast/ops/cpu_build.py)
        from gpt2fast.ops.cpu_build import sanitized_module

        _cpu = sanitized_module()
    else:
        from gpt2fast import _cpu
except ImportError as error:  # built by `pip install` unless GPT2FAST_BUILD_CPU=0
    _cpu, _IMPORT_ERROR = None, error
else:
    _IMPORT_ERROR = None
    if os.environ.get("GPT2FAST_CPU_ISA"):
        try:
            _cpu.select_isa(os.environ["GPT2FAST_CPU_ISA"])
        except ValueError as error:  # backend 'cpu' says so when chosen; the other backends still work
            _cpu, _IMPORT_ERROR = None, f"GPT2FAST_CPU_ISA: {error}"

_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}
_PANELS = 3  # the dtype code of int8 weights in panels (gpt2fast.quant.to_panels; csrc/cpu/common.h kI8Panels)

# Above this many rows (a prefill) fp32 and bf16 linears go to torch's F.linear (oneDNN), which measures faster
# there; int8 stays native at every size. 1 thread, GPT-2 124M's 12 x 4 projections, ms (python /tmp/big.py,
# 2026-12-06, a shared machine): rows 16 / 32 / 64 / 256: fp32 ours 15.9 / 24.2 / 47.4 / 189, F.linear 14.3 /
# 19.6 / 26.7 / 76.5; bf16 ours 11.5 / 20.8 / 38.3 / 154, F.linear 7.7 / 8.1 / 10.8 / 22.9; int8 ours 5.9 /
# 11.2 / 20.7 / 76.6, dequantize + F.linear 44.8 / 31.7 / 40.4 / 112.
LIBRARY_ROWS = 16


def available() -> bool:
    """Whether the native CPU module was built and imports.

    Example:
        >>> isinstance(available(), bool)
        True
    """
    return _cpu is not None


def unavailable_reason() -> str:
    """Why ``backend="cpu"`` cannot run here ("" when it can)."""
    if _cpu is None:
        return (f"backend 'cpu' needs the native module gpt2fast._cpu, which did not import ({_IMPORT_ERROR}); "
                "reinstall with a C++ compiler present (pip install -e .) and without GPT2FAST_BUILD_CPU=0")
    return ""


def isa() -> str:
    """The instruction set the kernels run with: ``"avx512"``, ``"avx2"`` or ``"portable"``.

    Example:
        >>> isa() in supported_isas()
        True
    """
    return _cpu.isa()


def int8_method() -> str:
    """How int8 weights meet activations with the current instruction set: ``"vnni"`` (activations quantized per
    row, exact int32 dot products: AVX-512) or ``"dequant"`` (weights widened to fp32 in registers: AVX2, portable).

    Example:
        >>> int8_method() in ("vnni", "dequant")
        True
    """
    return _cpu.int8_method()


def supported_isas() -> list[str]:
    """Every instruction set this CPU can run, best first (what ``select_isa`` accepts)."""
    return _cpu.supported_isas()


def select_isa(name: str) -> None:
    """Run the kernels of ``name`` from now on (tests use it to cover every path the machine has).

    Example:
        >>> previous = isa(); select_isa("portable"); isa()
        'portable'
        >>> select_isa(previous)
    """
    if name not in _cpu.supported_isas():
        raise ValueError(f"instruction set {name!r} is not available on this CPU; choose one of {supported_isas()}")
    _cpu.select_isa(name)


def _check_cpu(name: str, t: torch.Tensor) -> None:
    if t.device.type != "cpu":
        raise ValueError(f"backend 'cpu': {name} must be on the CPU, got {t.device}")


def _rows(name: str, x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` as 2-D rows with unit stride along the last dim (copied only if it is not)."""
    _check_cpu(name, x)
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"backend 'cpu': {name} must be (rows, {width}), got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"backend 'cpu': {name} must be float32 or bfloat16, got {x.dtype}")
    return x if x.stride(1) == 1 else x.contiguous()


def int8_panels(dtype: torch.dtype) -> bool:
    """Whether a model of ``dtype`` should hold its int8 weights in panels (``gpt2fast.quant.to_panels``): where the
    kernels quantize activations for VNNI (AVX-512) and the dtype runs natively. Why and what it measured:
    ``benchmarks/cpu_kernels.md``.

    Example:
        >>> int8_panels(torch.float16)
        False
    """
    return _cpu is not None and dtype in (torch.float32, torch.bfloat16) and int8_method() == "vnni"


def _weight(weight: torch.Tensor | Int8Weight) -> tuple[torch.Tensor, int, int, int, int]:
    """(the values: (N, K) or int8 panels, dtype code, scale pointer or 0, N, K)."""
    if isinstance(weight, Int8Weight):
        n, k = weight.shape
        scale = weight.scale
        if scale.dtype != torch.float32 or scale.shape != (n,) or not scale.is_contiguous():
            raise ValueError(f"backend 'cpu': an Int8Weight's scale must be contiguous float32 ({n},)")
        values, scale_ptr = weight.data, scale.data_ptr()
        if weight.panels and (values.dtype != torch.int8 or tuple(values.shape) != panel_shape(n, k)):
            raise ValueError(f"backend 'cpu': int8 panels for ({n}, {k}) must be {panel_shape(n, k)} int8, got "
                             f"{values.dtype} {tuple(values.shape)}")
    else:
        values, scale_ptr = weight, 0
    _check_cpu("weight", values)
    if len(weight.shape) != 2 or values.dtype not in _CODES or (values.dtype == torch.int8 and scale_ptr == 0):
        raise ValueError(f"backend 'cpu': a weight must be (N, K) float32, bfloat16 or Int8Weight, got "
                         f"{values.dtype} {tuple(values.shape)}")
    values = values.contiguous()
    code = _PANELS if isinstance(weight, Int8Weight) and weight.panels else _CODES[values.dtype]
    return values, code, scale_ptr, weight.shape[0], weight.shape[1]


def _vector(name: str, t: torch.Tensor | None, n: int, dtype: torch.dtype) -> torch.Tensor | None:
    if t is None:
        return None
    _check_cpu(name, t)
    if t.shape != (n,):
        raise ValueError(f"backend 'cpu': {name} must be ({n},), got {tuple(t.shape)}")
    return t.to(dtype).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def native(x: torch.Tensor, weight: torch.Tensor | Int8Weight) -> bool:
    """Whether the native kernels take these: fp32 or bf16 activations with fp32, bf16 or int8 weights. Others
    (fp16, fp64) run the torch backend's op, so every dtype the engine accepts works on ``backend="cpu"``.

    Example:
        >>> native(torch.randn(2, 3), torch.randn(4, 3)), native(torch.randn(2, 3).half(), torch.randn(4, 3).half())
        (True, False)
    """
    return x.dtype in (torch.float32, torch.bfloat16) and weight.dtype in _CODES


def _linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None, *, gelu: bool = False,
            residual: torch.Tensor | None = None, ln: tuple[torch.Tensor, torch.Tensor, float] | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    if not native(x, weight):
        if ln is not None:
            x = reference.layer_norm(x, *ln)
        if out_dtype is not None:  # the LM head
            return torch_native.lm_head(x, weight)
        return torch_native.linear(x, weight, bias, gelu=gelu, residual=residual)
    values, w_code, scale_ptr, n, k = _weight(weight)
    x = _rows("x", x, k)
    m, dtype = x.shape[0], x.dtype
    library = m > LIBRARY_ROWS and values.dtype == dtype  # int8 stays native
    if library and (out_dtype is None or out_dtype == dtype):  # (a bf16 LM head's fp32 logits stay native)
        return _library_linear(x, values, bias, gelu=gelu, residual=residual, ln=ln, out_dtype=out_dtype)
    out = torch.empty(m, n, dtype=out_dtype or dtype)  # (M, N)
    if m == 0:
        return out
    bias = _vector("bias", bias, n, dtype)
    ln_w = ln_b = None
    eps = 0.0
    if ln is not None:
        ln_w, ln_b, eps = _vector("ln_weight", ln[0], k, dtype), _vector("ln_bias", ln[1], k, dtype), float(ln[2])
    if residual is not None:
        _check_cpu("residual", residual)
        if residual.shape != (m, n):
            raise ValueError(f"backend 'cpu': residual must be ({m}, {n}), got {tuple(residual.shape)}")
        residual = residual.to(dtype)
        if residual.stride(1) != 1:
            residual = residual.contiguous()
    _cpu.linear(m, n, k, x.data_ptr(), x.stride(0), _CODES[dtype], _ptr(ln_w), _ptr(ln_b), eps,
                values.data_ptr(), w_code, scale_ptr, _ptr(bias), gelu, _ptr(residual),
                0 if residual is None else residual.stride(0), out.data_ptr(), n, _CODES[out.dtype],
                torch.get_num_threads())
    return out


def _library_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *, gelu: bool,
                    residual: torch.Tensor | None, ln: tuple[torch.Tensor, torch.Tensor, float] | None,
                    out_dtype: torch.dtype | None) -> torch.Tensor:
    """A prefill-sized linear through torch (oneDNN) in the model dtype: for bf16 the product is rounded to bf16
    once more than the reference rounds (torch has no bf16 GEMM with an fp32 result on a CPU)."""
    if ln is not None:
        x = reference.layer_norm(x, ln[0], ln[1], ln[2])  # (M, K)
    y = torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype)).float()  # (M, N)
    if gelu:
        y = torch.nn.functional.gelu(y, approximate="tanh")
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype or x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None, *, gelu: bool = False,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``reference.linear``: ``x @ weight.T + bias``, then tanh-GELU, then ``+ residual``; ``(T, N)`` in ``x.dtype``.

    Example:
        >>> x, w, b, r = torch.randn(2, 5), torch.randn(3, 5), torch.randn(3), torch.randn(2, 3)
        >>> torch.allclose(linear(x, w, b, residual=r), reference.linear(x, w, b, residual=r), atol=1e-5)
        True
    """
    return _linear(x, weight, bias, gelu=gelu, residual=residual)


def ln_linear(x: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float,
              weight: torch.Tensor | Int8Weight, bias: torch.Tensor | None, *, gelu: bool = False) -> torch.Tensor:
    """``reference.ln_linear``: the LayerNorm runs in the linear's prologue, once per row per call.

    Example:
        >>> x, g, h, w, b = torch.randn(3, 8), torch.rand(8), torch.randn(8), torch.randn(5, 8), torch.randn(5)
        >>> torch.allclose(ln_linear(x, g, h, 1e-5, w, b), reference.ln_linear(x, g, h, 1e-5, w, b), atol=1e-5)
        True
    """
    return _linear(x, weight, bias, gelu=gelu, ln=(ln_weight, ln_bias, eps))


def lm_head(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``reference.lm_head``: fp32 logits ``(N, V)``.

    Example:
        >>> x, wte = torch.randn(2, 6), torch.randn(11, 6)
        >>> torch.allclose(lm_head(x, wte), reference.lm_head(x, wte), atol=1e-5)
        True
    """
    return _linear(x, wte, None, out_dtype=torch.float32)


def _pick(x: torch.Tensor, wte: torch.Tensor | Int8Weight, temperature: torch.Tensor | None,
          seeds: torch.Tensor | None) -> torch.Tensor:
    if (temperature is None) != (seeds is None):
        raise ValueError("backend 'cpu': lm_head_gumbel needs both temperature and seeds")
    if wte.shape[0] == 0:
        raise ValueError("backend 'cpu': the LM head has an empty vocabulary")
    if not native(x, wte):
        if temperature is None:
            return torch_native.lm_head_argmax(x, wte)
        return torch_native.lm_head_gumbel(x, wte, temperature, seeds)
    values, w_code, scale_ptr, v, k = _weight(wte)
    x = _rows("x", x, k).contiguous()
    m = x.shape[0]
    ids = torch.empty(m, dtype=torch.int64)  # (N,)
    if m == 0:
        return ids
    temperature = _vector("temperature", temperature, m, torch.float32)
    seeds = _vector("seeds", seeds, m, torch.int64)
    _cpu.lm_head_pick(m, k, x.data_ptr(), _CODES[x.dtype], values.data_ptr(), w_code, scale_ptr, v,
                      _ptr(temperature), _ptr(seeds), GREEDY_BELOW, torch.get_num_threads(), ids.data_ptr())
    return ids


def lm_head_argmax(x: torch.Tensor, wte: torch.Tensor | Int8Weight) -> torch.Tensor:
    """``reference.lm_head_argmax``: greedy ids ``(N,)`` int64 (ties to the lowest id); logits never written.

    Example:
        >>> x, wte = torch.randn(3, 6), torch.randn(13, 6)
        >>> torch.equal(lm_head_argmax(x, wte), reference.lm_head_argmax(x, wte))
        True
    """
    return _pick(x, wte, None, None)


def lm_head_gumbel(x: torch.Tensor, wte: torch.Tensor | Int8Weight, temperature: torch.Tensor,
                   seeds: torch.Tensor) -> torch.Tensor:
    """``reference.lm_head_gumbel``: one Gumbel-max draw per row with the sampler's Philox noise ``(N,)`` int64.

    Example:
        >>> x, wte = torch.randn(2, 6), torch.randn(13, 6)
        >>> t, s = torch.tensor([0.0, 0.8]), torch.tensor([5, 6])
        >>> torch.equal(lm_head_gumbel(x, wte, t, s), reference.lm_head_gumbel(x, wte, t, s))
        True
    """
    return _pick(x, wte, temperature, seeds)


def _check_caches(k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, dim: int, dtype: torch.dtype) -> None:
    """Both caches contiguous ``(NB, heads, BS, dim)`` of ``dtype`` (the kernels index them as that)."""
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_cpu(name, c)
        if c.dim() != 4 or c.shape[1] != heads or c.shape[3] != dim or c.dtype != dtype or not c.is_contiguous():
            raise ValueError(f"backend 'cpu': {name} must be contiguous (blocks, {heads}, block_size, {dim}) {dtype}, "
                             f"got {c.dtype} {tuple(c.shape)}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"backend 'cpu': the K and V caches differ in shape: {tuple(k_cache.shape)} vs "
                         f"{tuple(v_cache.shape)}")


def write_kv_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """``reference.write_kv_attention``; natively when every sequence has one query (decode), else the torch backend's.

    Example:
        >>> kc = torch.randn(4, 2, 16, 8); vc = torch.randn_like(kc)
        >>> meta = AttentionMetadata.build([[0, 1]], [17], [1], block_size=16)
        >>> q, k, v = torch.randn(3, 1, 2, 8).unbind(0)
        >>> out = write_kv_attention(q, k, v, kc.clone(), vc.clone(), meta, 8**-0.5)
        >>> torch.allclose(out, reference.write_kv_attention(q, k, v, kc, vc, meta, 8**-0.5), atol=1e-5)
        True
    """
    tokens, heads, dim = q.shape
    decode = meta.num_seqs == tokens and meta.max_query_len == 1
    if not decode or q.dtype != k_cache.dtype or q.dtype not in (torch.float32, torch.bfloat16):
        return torch_native.write_kv_attention(q, k, v, k_cache, v_cache, meta, scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_cpu(name, t)
        if t.shape != (tokens, heads, dim) or t.stride(2) != 1 or t.dtype != q.dtype:
            raise ValueError(f"backend 'cpu': {name} must be ({tokens}, {heads}, {dim}) {q.dtype} with unit stride "
                             f"along the head dim, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    _check_caches(k_cache, v_cache, heads, dim, q.dtype)
    block_tables = meta.block_tables.to(torch.int32).contiguous()
    seq_lens = meta.seq_lens.to(torch.int32).contiguous()
    slots = meta.slot_mapping.to(torch.int64).contiguous()
    out = torch.empty(tokens, heads, dim, dtype=q.dtype)  # (T, H, D)
    if tokens:
        _cpu.decode_attention(tokens, heads, dim, k_cache.shape[2], q.data_ptr(), q.stride(0), q.stride(1),
                              k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0), v.stride(1),
                              k_cache.data_ptr(), v_cache.data_ptr(), _CODES[q.dtype], block_tables.data_ptr(),
                              block_tables.stride(0), seq_lens.data_ptr(), slots.data_ptr(), float(scale),
                              block_tables.shape[1], k_cache.shape[0], out.data_ptr(), torch.get_num_threads())
    return out


def decode_layers(config, layers: list[tuple], dtype: torch.dtype) -> DecodeLayers | None:
    """``DecodeLayers`` for a model of ``dtype``, or None where the native kernels do not take it (fp16: the model
    then runs decode steps op by op).

    Example:
        >>> from gpt2fast.config import GPT2Config
        >>> decode_layers(GPT2Config(n_layer=1, n_embd=8, n_head=2), [], torch.float16) is None
        True
    """
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    return DecodeLayers(config, layers, dtype)


class DecodeLayers:
    """Every transformer layer of a decode step in one native call (``csrc/cpu/decode_plan.h``), no Python between ops.

    Built once per model from each layer's parameters as the ops receive them (``GPT2.layer_params``); called with
    the residual stream ``(T, C)`` (updated in place), the KV cache and the step's metadata. Per layer it computes
    what ``GPT2.hidden``'s op-by-op loop computes, with the same roundings. Only for steps where every sequence has
    one query (decode); the model runs other steps op by op.

    Example:
        >>> from gpt2fast.config import GPT2Config
        >>> from gpt2fast.model import GPT2
        >>> from gpt2fast.cache import KVCache
        >>> cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=11, n_positions=8)
        >>> model, cache = GPT2(cfg).init_random(seed=0), KVCache(cfg, num_blocks=2, block_size=4)
        >>> layers = DecodeLayers(cfg, [model.layer_params(i) for i in range(2)], torch.float32)
        >>> meta = AttentionMetadata.build([[0]], [1], [1], block_size=4)
        >>> residual = torch.randn(1, 8)
        >>> layers(residual, cache, meta)
        >>> residual.shape
        torch.Size([1, 8])
    """

    def __init__(self, config, layers: list[tuple], dtype: torch.dtype) -> None:
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"backend 'cpu': the model dtype must be float32 or bfloat16, got {dtype}")
        self.dtype, self.num_layers, self.config = dtype, len(layers), config
        c, f = config.n_embd, config.mlp_width
        shapes = ((c,), (c,), (3 * c, c), (3 * c,), (c, c), (c,), (c,), (c,), (f, c), (f,), (c, f), (c,))
        self._keep: list = []  # every tensor the plan points into stays alive with it
        self._checked_cache, self._caches = None, []  # the last KV cache checked, and its layers' pointers
        self._plan = _cpu.DecodePlan(config.n_embd, config.n_head, config.mlp_width, _CODES[dtype],
                                     float(config.layer_norm_epsilon))
        for i, (ln1_w, ln1_b, qkv, qkv_b, proj, proj_b, ln2_w, ln2_b, fc, fc_b, out, out_b) in enumerate(layers):
            args: list = []
            names = ("ln_1.weight", "ln_1.bias", "c_attn", "c_attn.bias", "attn.c_proj", "attn.c_proj.bias",
                     "ln_2.weight", "ln_2.bias", "c_fc", "c_fc.bias", "mlp.c_proj", "mlp.c_proj.bias")
            params = (ln1_w, ln1_b, qkv, qkv_b, proj, proj_b, ln2_w, ln2_b, fc, fc_b, out, out_b)
            for name, t, shape in zip(names, params, shapes):
                if tuple(t.shape) != shape:
                    raise ValueError(f"backend 'cpu': layer {i} {name} must be {shape}, got {tuple(t.shape)}")
                if len(shape) == 2:  # a weight; else a vector
                    values, code, scale_ptr, _, _ = _weight(t)
                    self._keep += [values, t]
                    args += [values.data_ptr(), code, scale_ptr]
                else:
                    vec = _vector(f"layer {i} {name}", t, t.shape[0], dtype)
                    self._keep.append(vec)
                    args.append(vec.data_ptr())
            self._plan.add_layer(*args, float(config.attn_scale(i)))

    def __call__(self, residual: torch.Tensor, cache, meta: AttentionMetadata) -> None:
        if residual.dtype != self.dtype or not residual.is_contiguous() or residual.dim() != 2:
            raise ValueError(f"backend 'cpu': the residual stream must be contiguous (T, C) {self.dtype}")
        tokens = residual.shape[0]
        if residual.shape[1] != self.config.n_embd:
            raise ValueError(f"backend 'cpu': the residual stream must be (T, {self.config.n_embd}), got "
                             f"{tuple(residual.shape)}")
        if meta.num_seqs != tokens or meta.max_query_len != 1:
            raise ValueError("backend 'cpu': DecodeLayers runs decode steps only (one query per sequence)")
        if cache is not self._checked_cache:  # every layer's K/V once per cache, not every step
            heads = self.config.n_head
            for i in range(self.num_layers):
                _check_caches(cache.k[i], cache.v[i], heads, self.config.n_embd // heads, self.dtype)
            self._caches = [t.data_ptr() for i in range(self.num_layers) for t in (cache.k[i], cache.v[i])]
            self._checked_cache = cache
        caches = self._caches
        block_tables = meta.block_tables.to(torch.int32).contiguous()
        seq_lens = meta.seq_lens.to(torch.int32).contiguous()
        slots = meta.slot_mapping.to(torch.int64).contiguous()
        self._plan.run(residual.data_ptr(), tokens, caches, cache.k[0].shape[2], block_tables.data_ptr(),
                       block_tables.stride(0), block_tables.shape[1], cache.k[0].shape[0], seq_lens.data_ptr(),
                       slots.data_ptr(), torch.get_num_threads())
