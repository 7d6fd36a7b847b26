"""GPT-2 forward over a flat batch of tokens and the paged KV cache; math lives in the ops.

Parameter names are our canonical checkpoint layout (every loader maps onto them):
``wte.weight (V, C)``, ``wpe.weight (P, C)``, ``h.{i}.ln_1.{weight,bias}``,
``h.{i}.attn.c_attn.{weight (3C, C), bias}``, ``h.{i}.attn.c_proj.{weight (C, C), bias}``,
``h.{i}.ln_2.*``, ``h.{i}.mlp.c_fc.{weight (F, C), bias}``, ``h.{i}.mlp.c_proj.{weight (C, F), bias}``,
``ln_f.*``. Linear weights are ``(out, in)`` like ``nn.Linear``; the LM head is ``wte``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gpt2fast.cache import KVCache
from gpt2fast.checkpoint.layout import progress
from gpt2fast.config import GPT2Config
from gpt2fast.metadata import AttentionMetadata
from gpt2fast.ops import TORCH, Ops


class Linear(nn.Module):
    """Holds a ``(out, in)`` weight and a bias; the op that uses them is chosen by the model."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features))


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
    """GPT-2 with pre-LN blocks and a tied LM head, computed by one backend's ops.

    Example:
        >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
        >>> model = GPT2(cfg).init_random(seed=0)
        >>> cache = KVCache(cfg, num_blocks=1, block_size=4)
        >>> meta = AttentionMetadata.build([[0]], [3], [3], block_size=4)
        >>> model(torch.tensor([1, 2, 3]), torch.arange(3), cache, meta).shape
        torch.Size([1, 11])
    """

    def __init__(self, config: GPT2Config, ops: Ops = TORCH) -> None:
        super().__init__()
        self.config, self.ops = config, ops
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd)
        self._decode_layers = None  # ops.decode_layers' object, built at the first decode step that uses it

    def layer_params(self, i: int) -> tuple:
        """Layer ``i``'s parameters as the ops receive them, in ``hidden``'s order: ln_1 weight, bias; c_attn weight,
        bias; attn.c_proj weight, bias; ln_2 weight, bias; c_fc weight, bias; mlp.c_proj weight, bias."""
        b = self.h[i]
        return (b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                b.mlp.c_proj.weight, b.mlp.c_proj.bias)

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Run one step; returns fp32 logits ``(N, V)`` for the rows in ``meta.logits_indices``.

        ``input_ids``/``positions``: ``(T,)``. K/V of these tokens are written to the cache.
        """
        return self.ops.lm_head(self.hidden(input_ids, positions, cache, meta), self.wte.weight)

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
        residual = ops.embed(input_ids, positions, self.wte.weight, self.wpe.weight)  # (T, C)
        one_query_each = meta.max_query_len == 1 and meta.num_seqs == num_tokens  # a decode step
        if capture is None and ops.decode_layers is not None and one_query_each and num_tokens <= ops.decode_rows:
            if self._decode_layers is None:  # every layer of a decode step in one native call (False: not here)
                self._decode_layers = ops.decode_layers(cfg, [self.layer_params(i) for i in range(cfg.n_layer)],
                                                        residual.dtype) or False
            if self._decode_layers:
                self._decode_layers(residual, cache, meta)
                return ops.layer_norm(residual[meta.logits_indices], self.ln_f.weight, self.ln_f.bias, eps)  # (N, C)
        for i, block in enumerate(self.h):
            attn_in = (block.ln_1.weight, block.ln_1.bias, eps, block.attn.c_attn.weight, block.attn.c_attn.bias)
            qkv = ops.ln_linear(residual, *attn_in)  # (T, 3C)
            q, k, v = qkv.view(num_tokens, 3, cfg.n_head, cfg.head_dim).unbind(1)  # 3 x (T, H, D)
            if capture is None:  # write_kv then attention; Triton's decode does both in one launch
                attn = ops.write_kv_attention(q, k, v, cache.k[i], cache.v[i], meta, cfg.attn_scale(i))  # (T, H, D)
            else:
                ops.write_kv(k, v, cache.k[i], cache.v[i], meta.slot_mapping)
                attn = capture.attend(ops, q, k, cache, i, meta, cfg.attn_scale(i))  # (T, H, D)
            attn = attn.reshape(num_tokens, cfg.n_embd)  # (T, C)
            residual = ops.linear(attn, block.attn.c_proj.weight, block.attn.c_proj.bias, residual=residual)  # (T, C)
            mlp_in = (block.ln_2.weight, block.ln_2.bias, eps, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
            hidden = ops.ln_linear(residual, *mlp_in, gelu=True)  # (T, F)
            residual = ops.linear(hidden, block.mlp.c_proj.weight, block.mlp.c_proj.bias, residual=residual)  # (T, C)
        rows = meta.logits_indices
        return ops.layer_norm(residual[rows], self.ln_f.weight, self.ln_f.bias, eps)  # (N, C)

    @classmethod
    def from_state_dict(
        cls,
        config: GPT2Config,
        state: dict[str, torch.Tensor],
        ops: Ops = TORCH,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> GPT2:
        """Build on the meta device, then assign the weights (moved and cast; a progress bar for big ones).

        Example:
            >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=11, n_positions=4)
            >>> state = GPT2(cfg).init_random(seed=0).state_dict()
            >>> GPT2.from_state_dict(cfg, state, dtype=torch.float16).wte.weight.dtype
            torch.float16
        """
        with torch.device("meta"):
            model = cls(config, ops)
        total = sum(t.numel() * t.element_size() for t in state.values())
        weights = {name: t.to(device, dtype) for name, t in progress(state.items(), total, "loading weights")}
        model.load_state_dict(weights, strict=True, assign=True)
        return model.requires_grad_(False)  # inference only: no autograd graph behind any op

    @torch.no_grad()
    def init_random(self, seed: int = 0) -> GPT2:
        """Fill every parameter with seeded random values (GPT-2's init scale, non-zero biases).

        Biases and LayerNorm parameters get random values too, so a bug that drops one shows.
        """
        gen = torch.Generator().manual_seed(seed)
        proj_std = 0.02 / (2 * self.config.n_layer) ** 0.5
        for name, param in self.named_parameters():
            if name.startswith("ln") or ".ln_" in name:
                values = torch.randn(param.shape, generator=gen) * 0.1 + (1.0 if name.endswith("weight") else 0.0)
            else:
                std = proj_std if name.endswith("c_proj.weight") else 0.02
                values = torch.randn(param.shape, generator=gen) * std
            param.copy_(values.to(param.dtype))
        return self
