"""GPT-2 forward over a flat batch of tokens and the paged KV cache; math lives in the ops.

Parameter names are our canonical checkpoint layout (every loader maps onto them):
``wte.weight (V, C)``, ``wpe.weight (P, C)``, ``h.{i}.ln_1.{weight,bias}``,
``h.{i}.attn.c_attn.{weight (3C, C), bias}``, ``h.{i}.attn.c_proj.{weight (C, C), bias}``,
``h.{i}.ln_2.*``, ``h.{i}.mlp.c_fc.{weight (F, C), bias}``, ``h.{i}.mlp.c_proj.{weight (C, F), bias}``,
``ln_f.*``. Linear weights are ``(out, in)`` like ``nn.Linear``; the LM head is ``wte``.

With ``quantization="int8"`` (``gpt2fast.quant``) ``wte.weight`` and every linear's ``weight`` are int8 buffers
beside fp32 ``weight_scale`` buffers ``(out,)`` (so ``state_dict`` and ``.to(device)`` carry both); ``wpe``,
biases and LayerNorms stay in the model dtype. The model hands ops ``op_weight(module)``: the weight tensor, or
an ``Int8Weight`` over those two buffers. Where the backend streams int8 weights in panels (``Ops.int8_panels``:
the native CPU kernels with VNNI) the int8 buffers are panels ``(ceil(out / 16), in / 4, 16, 4)``, not
``(out, in)``; ``dense_state_dict`` gives the float layout either way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from gpt2fast.cache import KVCache
from gpt2fast.checkpoint.arena import WeightArena, arena_enabled
from gpt2fast.checkpoint.layout import progress, trim_heap
from gpt2fast.config import GPT2Config
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import TORCH, Ops
from gpt2fast.quant import PANEL_K, Int8Weight, check_quantization, panel_shape, quantize_int8, to_panels


class Linear(nn.Module):
    """Holds a ``(out, in)`` weight and a bias; the op that uses them is chosen by the model."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))


def op_weight(module: nn.Module) -> torch.Tensor | Int8Weight:
    """``module.weight`` as ops take it: the tensor, or the int8 ``weight`` with its ``weight_scale`` as an Int8Weight.

    Example:
        >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
        >>> type(op_weight(GPT2(cfg).wte)).__name__, type(op_weight(GPT2(cfg, quantization="int8").wte)).__name__
        ('Parameter', 'Int8Weight')
    """
    weight = module.weight
    return Int8Weight(weight, module.weight_scale) if weight.dtype == torch.int8 else weight


def _int8_slots(module: nn.Module, panels: bool) -> None:
    """Swap ``module.weight`` (N, K) for an int8 buffer of that shape (or in panels: ``quant.panel_shape``) and a
    ``weight_scale`` (N,) fp32 buffer."""
    n, k = module.weight.shape
    del module.weight
    module.register_buffer("weight", torch.zeros(panel_shape(n, k) if panels else (n, k), dtype=torch.int8))
    module.register_buffer("weight_scale", torch.ones(n))


class Embedding(nn.Module):
    """Holds a ``(num, width)`` table. Not ``nn.Embedding``: its init runs ``normal_``, which on the meta device
    imports torch's decompositions (sympy and ~900 modules, 145 MB of RSS) and on the CPU fills a table loading
    overwrites anyway."""

    def __init__(self, num: int, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, width))


class LayerNorm(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width))


class Attention(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c_attn = Linear(c, 3 * c)
        self.c_proj = Linear(c, c)


class MLP(nn.Module):
    def __init__(self, c: int, width: int) -> None:
        super().__init__()
        self.c_fc = Linear(c, width)
        self.c_proj = Linear(width, c)


class Block(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = Attention(config.n_embd)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config.n_embd, config.mlp_width)


@dataclass
class AttentionCapture:
    """What a capture forward (``GPT2.hidden(..., capture=)``) records, one entry per layer, on the model's device.

    ``probs[i]``: layer ``i``'s fp32 probabilities ``(B, H, max_query_len, max_seq_len)``, padded as
    ``ops.attention_with_probs`` returns them. With ``qk``, ``queries[i]`` and ``keys[i]``: the
    per-head vectors ``(H, T, D)`` fp32 that layer's attention used (keys of this step's tokens only).

    Example:
        >>> cfg = GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
        >>> model, cache = GPT2(cfg).init_random(seed=0), KVCache(cfg, num_blocks=1, block_size=4)
        >>> meta = AttentionMetadata.build([[0]], [3], [3], block_size=4)
        >>> capture = AttentionCapture(qk=True)
        >>> _ = model.hidden(torch.tensor([1, 2, 3]), torch.arange(3), cache, meta, capture=capture)
        >>> len(capture.probs), tuple(capture.probs[0].shape), tuple(capture.queries[1].shape)
        (2, (1, 2, 3, 3), (2, 3, 4))
    """

    qk: bool = False
    probs: list[torch.Tensor] = field(default_factory=list)
    queries: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)

    def attend(self, ops: Ops, q: torch.Tensor, k: torch.Tensor, cache: KVCache, layer: int,
               meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """``ops.attention`` through ``ops.attention_with_probs``, recording what this layer computed."""
        out, probs = ops.attention_with_probs(q, cache.k[layer], cache.v[layer], meta, scale)  # (T, H, D), (B, H, ...)
        self.probs.append(probs)
        if self.qk:
            self.queries.append(q.transpose(0, 1).to(torch.float32, copy=True))  # (H, T, D)
            self.keys.append(k.transpose(0, 1).to(torch.float32, copy=True))  # (H, T, D)
        return out


class GPT2(nn.Module):
    """GPT-2 with pre-LN blocks and a tied LM head, computed by one backend's ops; ``quantization``: None or "int8".

    Example:
        >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
        >>> model = GPT2(cfg).init_random(seed=0)
        >>> cache = KVCache(cfg, num_blocks=1, block_size=4)
        >>> meta = AttentionMetadata.build([[0]], [3], [3], block_size=4)
        >>> model(torch.tensor([1, 2, 3]), torch.arange(3), cache, meta).shape
        torch.Size([1, 11])
    """

    def __init__(self, config: GPT2Config, ops: Ops = TORCH, quantization: str | None = None,
                 int8_panels: bool = False) -> None:
        super().__init__()
        self.config, self.ops = config, ops
        self.quantization = check_quantization(quantization)
        self.int8_panels = bool(self.quantization) and int8_panels
        self.wte = Embedding(config.vocab_size, config.n_embd)
        self.wpe = Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd)
        if self.quantization:
            for module in self.quantized_modules().values():
                _int8_slots(module, self.int8_panels)
        self._decode_layers = None  # ops.decode_layers' object, built at the first decode step that uses it

    def quantized_modules(self) -> dict[str, nn.Module]:
        """Name -> module of every weight ``quantization`` applies to: ``wte`` and each block's four linears.

        Example:
            >>> list(GPT2(GPT2Config(n_layer=1, n_embd=8, n_head=2)).quantized_modules())[:3]
            ['wte', 'h.0.attn.c_attn', 'h.0.attn.c_proj']
        """
        return {"wte": self.wte} | {name: m for name, m in self.h.named_modules(prefix="h") if isinstance(m, Linear)}

    @property
    def wte_weight(self) -> torch.Tensor | Int8Weight:
        """The tied embedding / LM head as ops take it (``op_weight(self.wte)``)."""
        return op_weight(self.wte)

    def _apply(self, fn, recurse: bool = True):  # .to(), .half(), ...: the native plan points at the old tensors
        self._decode_layers = None
        return super()._apply(fn, recurse)

    def load_state_dict(self, *args, **kwargs):  # new weights: the plan is rebuilt at the next decode step
        self._decode_layers = None
        return super().load_state_dict(*args, **kwargs)

    def layer_params(self, i: int) -> tuple:
        """Layer ``i``'s parameters as the ops receive them (linear weights through ``op_weight``), in ``hidden``'s
        order: ln_1 weight, bias; c_attn weight, bias; attn.c_proj weight, bias; ln_2 weight, bias; c_fc weight,
        bias; mlp.c_proj weight, bias."""
        b = self.h[i]
        return (b.ln_1.weight, b.ln_1.bias, op_weight(b.attn.c_attn), b.attn.c_attn.bias, op_weight(b.attn.c_proj),
                b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, op_weight(b.mlp.c_fc), b.mlp.c_fc.bias,
                op_weight(b.mlp.c_proj), b.mlp.c_proj.bias)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Run one step; returns fp32 logits ``(N, V)`` for the rows in ``meta.logits_indices``.

        ``input_ids``/``positions``: ``(T,)``. K/V of these tokens are written to the cache.
        """
        return self.ops.lm_head(self.hidden(input_ids, positions, cache, meta), self.wte_weight)

    @torch.no_grad()
    def hidden(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        meta: AttentionMetadata,
        capture: AttentionCapture | None = None,
    ) -> torch.Tensor:
        """Run one step up to the LM head: the final LayerNorm's output ``(N, C)`` for ``meta.logits_indices``.

        Per layer (pre-LN): ``ln_linear(residual, ln_1, c_attn)`` -> ``write_kv_attention`` (``write_kv`` then
        ``attention``; on Triton's decode path one launch) ->
        ``linear(c_proj, residual=residual)`` -> ``ln_linear(residual, ln_2, c_fc, gelu)`` ->
        ``linear(mlp.c_proj, residual=residual)``. Each LayerNorm rides in the linear that reads its output
        (on Triton's decode path: one launch) and each projection adds itself to the residual stream in its
        epilogue (one rounding to the model dtype, of ``x @ W.T + b + residual``), so no op touches the
        residual stream alone; ``ln_f`` runs on the ``N`` rows that need logits.

        The caller then projects it (``ops.lm_head``) or lets the LM head pick the token itself
        (``ops.lm_head_argmax`` / ``ops.lm_head_gumbel``), which never writes the ``(N, V)`` logits.
        With ``capture`` every layer attends through ``ops.attention_with_probs`` (slow, for inspection)
        and ``capture`` records the probabilities (and q/k); without it the step costs one ``if`` per layer more.
        """
        cfg, ops = self.config, self.ops
        num_tokens = input_ids.shape[0]
        eps = cfg.layer_norm_epsilon
        residual = ops.embed(input_ids, positions, self.wte_weight, self.wpe.weight)  # (T, C)
        one_query_each = meta.max_query_len == 1 and meta.num_seqs == num_tokens  # a decode step
        native = capture is None and ops.decode_layers is not None and one_query_each and num_tokens <= ops.decode_rows
        if native and self._decode_layers is None:  # every layer of a decode step in one native call (False: not here)
            self._decode_layers = ops.decode_layers(cfg, [self.layer_params(i) for i in range(cfg.n_layer)],
                                                    residual.dtype) or False
        if native and self._decode_layers:
            self._decode_layers(residual, cache, meta)
        else:
            residual = self._layers(residual, cache, meta, capture)
        rows = meta.logits_indices
        return ops.layer_norm(residual[rows], self.ln_f.weight, self.ln_f.bias, eps)  # (N, C)

    def _layers(self, residual: torch.Tensor, cache: KVCache, meta: AttentionMetadata,
                capture: AttentionCapture | None) -> torch.Tensor:
        """``hidden``'s transformer layers op by op (see there); returns the residual stream ``(T, C)``."""
        cfg, ops = self.config, self.ops
        num_tokens, eps = residual.shape[0], cfg.layer_norm_epsilon
        for i, block in enumerate(self.h):
            attn_in = (block.ln_1.weight, block.ln_1.bias, eps, op_weight(block.attn.c_attn), block.attn.c_attn.bias)
            qkv = ops.ln_linear(residual, *attn_in)  # (T, 3C)
            q, k, v = qkv.view(num_tokens, 3, cfg.n_head, cfg.head_dim).unbind(1)  # 3 x (T, H, D)
            if capture is None:  # write_kv then attention; Triton's decode does both in one launch
                attn = ops.write_kv_attention(q, k, v, cache.k[i], cache.v[i], meta, cfg.attn_scale(i))  # (T, H, D)
            else:
                ops.write_kv(k, v, cache.k[i], cache.v[i], meta.slot_mapping)
                attn = capture.attend(ops, q, k, cache, i, meta, cfg.attn_scale(i))  # (T, H, D)
            attn = attn.reshape(num_tokens, cfg.n_embd)  # (T, C)
            residual = ops.linear(attn, op_weight(block.attn.c_proj), block.attn.c_proj.bias, residual=residual)
            mlp_in = (block.ln_2.weight, block.ln_2.bias, eps, op_weight(block.mlp.c_fc), block.mlp.c_fc.bias)
            hidden = ops.ln_linear(residual, *mlp_in, gelu=True)  # (T, F)
            residual = ops.linear(hidden, op_weight(block.mlp.c_proj), block.mlp.c_proj.bias, residual=residual)
        return residual

    @classmethod
    def from_state_dict(
        cls,
        config: GPT2Config,
        state: dict[str, torch.Tensor | Int8Weight],
        ops: Ops = TORCH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: str | None = None,
        consume: bool = False,
    ) -> GPT2:
        """Build on the meta device, then assign the weights (moved and cast; a progress bar for big ones).

        ``state`` is our canonical float layout. With ``quantization="int8"`` each weight of
        ``quantized_modules`` is quantized as it is read (on the CPU, from its stored dtype; or arrives as an
        ``Int8Weight`` already) and ``state`` is emptied as it goes, so each float tensor is freed once converted
        and no second full copy ever exists; ``consume=True`` empties it in every case (a caller that hands over
        its only reference, as ``Engine`` does).

        On a CPU the weights are copied into one ``WeightArena`` (``gpt2fast.checkpoint.arena``: transparent huge
        pages, ~1.5x the read bandwidth of a decode step's weight stream); ``GPT2FAST_HUGE_PAGES=0`` keeps them
        as ordinary tensors.

        Example:
            >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
            >>> state = GPT2(cfg).init_random(seed=0).state_dict()
            >>> GPT2.from_state_dict(cfg, state, dtype=torch.float16).wte.weight.dtype
            torch.float16
            >>> model = GPT2.from_state_dict(cfg, state, quantization="int8")
            >>> model.wte.weight.dtype, model.wte.weight_scale.shape, len(state)
            (torch.int8, torch.Size([11]), 0)
        """
        panels = (ops.int8_panels is not None and ops.int8_panels(dtype)
                  and config.n_embd % PANEL_K == 0 and config.mlp_width % PANEL_K == 0)
        with torch.device("meta"):
            model = cls(config, ops, quantization, int8_panels=panels)
        quantized = {name + ".weight" for name in model.quantized_modules()} if model.quantization else set()
        total = sum(t.data.numel() if isinstance(t, Int8Weight) else t.numel() * t.element_size()
                    for t in state.values())
        place = _placer(model, quantized, device, dtype, copy=bool(quantized))
        weights = {}
        for name in progress(list(state), total, "loading weights"):
            tensor = state.pop(name) if quantized or consume else state[name]
            if isinstance(tensor, Int8Weight) and name not in quantized:
                raise ValueError(f"{name} arrives as int8 weights, but the model is built with quantization=None")
            if name in quantized:
                int8 = tensor if isinstance(tensor, Int8Weight) else quantize_int8(tensor)
                q = place(name, int8.q.to(device))  # into panels if the model holds them (_placer)
                scale = place(name + "_scale", int8.scale.to(device))
                weights[name], weights[name + "_scale"] = q, scale
            else:  # copied when quantizing: a view into a memory-mapped file would keep all of the file resident
                weights[name] = place(name, tensor.to(device, dtype))
            del tensor  # the last reference of a quantized float weight: freed before the next one is read
            if quantized:
                trim_heap()
        model.load_state_dict(weights, strict=True, assign=True)
        return model.requires_grad_(False)  # inference only: no autograd graph behind any op

    def dense_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` in the float layout: int8 weights dequantized to the model dtype, no ``weight_scale``.

        What a float model holding the same values loads (``hf_twin``, the int8 tests' reference).

        Example:
            >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
            >>> state = GPT2(cfg).init_random(seed=0).state_dict()
            >>> int8 = GPT2.from_state_dict(cfg, dict(state), quantization="int8").dense_state_dict()
            >>> int8.keys() == state.keys(), bool((int8["wte.weight"] - state["wte.weight"]).abs().max() < 1e-3)
            (True, True)
        """
        dense = self.state_dict()
        for name, module in self.quantized_modules().items():
            weight = op_weight(module)
            if isinstance(weight, Int8Weight):
                del dense[name + ".weight_scale"]
                dense[name + ".weight"] = weight.dequantize(self.wpe.weight.dtype)
        return dense

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> GPT2:
        """Fill every parameter with seeded random values (GPT-2's init scale, non-zero biases).

        The values are ``random_weights(config, seed)``'s. A quantized model has no float weights to fill: build
        it from them with ``from_state_dict(..., quantization=)``.
        """
        if self.quantization:
            raise ValueError(f"init_random fills float weights; this model holds {self.quantization} weights")
        for param, (_, values) in zip(self.parameters(), random_weights(self.config, seed), strict=True):
            param.copy_(values.to(param.dtype))
        return self


def _placer(model: GPT2, quantized: set[str], device: torch.device | str, dtype: torch.dtype, copy: bool):
    """``place(name, tensor)``: ``tensor`` copied into the model's ``WeightArena`` on a CPU (a transposed view
    straight from the checkpoint, no contiguous temporary); elsewhere made contiguous, and a copy if ``copy``.
    An int8 weight the model holds in panels is rearranged into them as it is copied (``quant.to_panels``)."""
    targets = {name: (tuple(t.shape), t.dtype if name.removesuffix("_scale") in quantized else dtype)
               for name, t in model.state_dict().items()}  # the meta model: every weight's final shape and dtype

    def panels(name: str, tensor: torch.Tensor) -> bool:  # an (N, K) int8 weight the model holds in panels
        shape = targets.get(name, ((),))[0]
        return (name in quantized and len(shape) == 4 and tensor.dim() == 2 and tensor.shape[1] % PANEL_K == 0
                and panel_shape(*tensor.shape) == shape)  # (else load_state_dict's strict check names the shape)

    if not arena_enabled(device):
        def place_plain(name: str, tensor: torch.Tensor) -> torch.Tensor:
            if panels(name, tensor):
                return to_panels(tensor)
            return tensor.clone(memory_format=torch.contiguous_format) if copy else tensor.contiguous()

        return place_plain
    arena = WeightArena(WeightArena.size_for(list(targets.values())))

    def place(name: str, tensor: torch.Tensor) -> torch.Tensor:
        shape, target = targets.get(name, (None, None))
        if panels(name, tensor):
            return to_panels(tensor, out=arena.take(shape, target))
        if tuple(tensor.shape) != shape:  # a name or shape the model lacks: load_state_dict's strict check says so
            return tensor.contiguous()
        return arena.take(shape, target).copy_(tensor)

    return place


def random_weights(config: GPT2Config, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random fp32 weights in parameter order, one tensor at a time (GPT-2's init scale).

    Biases and LayerNorm parameters get random values too, so a bug that drops one shows. One tensor at a
    time, so a loader that quantizes them as they come never holds the float model.

    Example:
        >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
        >>> name, wte = next(random_weights(cfg, seed=0))
        >>> name, tuple(wte.shape), torch.equal(wte, GPT2(cfg).init_random(seed=0).wte.weight)
        ('wte.weight', (11, 8), True)
    """
    with torch.device("meta"):
        shapes = [(name, param.shape) for name, param in GPT2(config).named_parameters()]
    gen = torch.Generator().manual_seed(seed)
    proj_std = 0.02 / (2 * config.n_layer) ** 0.5
    for name, shape in shapes:  # in place: one (shape) temporary, even for the 154 MB wte
        if name.startswith("ln") or ".ln_" in name:
            yield name, torch.randn(shape, generator=gen).mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)
        else:
            yield name, torch.randn(shape, generator=gen).mul_(proj_std if name.endswith("c_proj.weight") else 0.02)
