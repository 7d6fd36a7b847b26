"""What a GPT-2 is: its shape and the few switches real checkpoints carry.

``GPT2Config`` is a plain dataclass; ``PRESETS`` names the released sizes. Any other shape is
allowed (tests use tiny odd ones). ``from_hf_dict`` / ``from_openai_hparams`` map the two
checkpoint formats' config files onto it, refusing what we do not compute.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

# HF activation names that mean GPT-2's tanh-approximated GELU.
_TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

# Upper bounds far beyond any GPT-2 (48 layers, width 1600, 50257 tokens, 1024 positions), checked before
# anything is allocated: a config asking for 10**9 positions or 10**6 layers fails at once, not after minutes
# and gigabytes. The byte budget of a whole model is checked where weights are made (checkpoint.random).
MAX_SIZES = {"n_layer": 1024, "n_embd": 65536, "n_head": 65536, "vocab_size": 2**21, "n_positions": 2**20,
             "n_inner": 2**18}


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2 model.

    Example:
        >>> cfg = GPT2Config(n_layer=3, n_embd=96, n_head=6, vocab_size=1000, n_positions=64)
        >>> cfg.head_dim, cfg.mlp_width
        (16, 384)
    """

    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    vocab_size: int = 50257
    n_positions: int = 1024
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256  # may lie outside a tiny test vocab: then generation never meets it, as in HF
    scale_attn_weights: bool = True  # divide scores by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # also divide scores of layer i by (i + 1)

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_embd", "n_head", "vocab_size", "n_positions"):
            if not _is_int(getattr(self, name), minimum=1):
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name, limit in MAX_SIZES.items():
            if isinstance(getattr(self, name), int) and getattr(self, name) > limit:
                raise ValueError(f"GPT2Config.{name} is {getattr(self, name)}, more than gpt2fast's limit of {limit}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_inner is not None and not _is_int(self.n_inner, minimum=1):
            raise ValueError(f"GPT2Config.n_inner must be a positive integer or None, got {self.n_inner!r}")
        if not _is_int(self.eos_token_id, minimum=0):
            raise ValueError(f"GPT2Config.eos_token_id must be a non-negative integer, got {self.eos_token_id!r}")
        eps = self.layer_norm_epsilon
        if not isinstance(eps, float | int) or isinstance(eps, bool) or not 0 < eps < 1:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a number in (0, 1), got {eps!r}")
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"GPT2Config.{name} must be true or false, got {getattr(self, name)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def attn_scale(self, layer: int) -> float:
        """Factor applied to q.k in ``layer``, as Hugging Face's GPT2Attention computes it.

        Example:
            >>> GPT2Config(scale_attn_by_inverse_layer_idx=True).attn_scale(1)
            0.0625
        """
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= layer + 1
        return scale

    def num_params(self) -> int:
        """Parameter count with the LM head tied to the token embedding.

        Example:
            >>> round(PRESETS["gpt2"].num_params() / 1e6)
            124
        """
        c, f = self.n_embd, self.mlp_width
        per_layer = 4 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * f + f) + (f * c + c)
        return self.vocab_size * c + self.n_positions * c + self.n_layer * per_layer + 2 * c

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> GPT2Config:
        """Map a Hugging Face ``config.json`` dict onto a config, refusing what we cannot compute.

        ``reorder_and_upcast_attn`` only changes *how* HF computes attention (fp32, scale first);
        we always compute softmax in fp32, so it is honoured as is.

        Example:
            >>> GPT2Config.from_hf_dict({"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100}).n_layer
            2
        """
        if not isinstance(hf, dict):
            raise ValueError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json: model_type is {model_type!r}; gpt2fast loads only 'gpt2' checkpoints")
        activation = hf.get("activation_function", "gelu_new")
        if activation not in _TANH_GELU_NAMES:
            raise ValueError(
                f"config.json: activation_function {activation!r} is not supported; "
                f"GPT-2 uses tanh-GELU ({', '.join(_TANH_GELU_NAMES)})"
            )
        if not hf.get("tie_word_embeddings", True):
            raise ValueError("config.json: tie_word_embeddings is false; GPT-2's LM head must be the token embedding")
        if hf.get("add_cross_attention", False):
            raise ValueError("config.json: add_cross_attention is set; gpt2fast runs decoder-only GPT-2")
        defaults = cls()
        eos = hf.get("eos_token_id")
        return cls(
            n_layer=hf.get("n_layer", defaults.n_layer),
            n_embd=hf.get("n_embd", defaults.n_embd),
            n_head=hf.get("n_head", defaults.n_head),
            vocab_size=hf.get("vocab_size", defaults.vocab_size),
            n_positions=hf.get("n_positions", defaults.n_positions),
            n_inner=hf.get("n_inner"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", defaults.layer_norm_epsilon),
            eos_token_id=eos if isinstance(eos, int) else defaults.eos_token_id,
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        )

    @classmethod
    def from_openai_hparams(cls, hparams: dict[str, Any]) -> GPT2Config:
        """Map OpenAI's ``hparams.json`` (n_vocab, n_ctx, n_embd, n_head, n_layer) onto a config.

        Example:
            >>> GPT2Config.from_openai_hparams({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768,
            ...                                 "n_head": 12, "n_layer": 12}) == PRESETS["gpt2"]
            True
        """
        if not isinstance(hparams, dict):
            raise ValueError(f"must hold a JSON object, got {type(hparams).__name__}")
        missing = {"n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"} - hparams.keys()
        if missing:
            raise ValueError(f"missing {sorted(missing)}")
        if not _is_int(hparams["n_vocab"], minimum=1):
            raise ValueError(f"n_vocab must be a positive integer, got {hparams['n_vocab']!r}")
        return cls(
            n_layer=hparams["n_layer"],
            n_embd=hparams["n_embd"],
            n_head=hparams["n_head"],
            vocab_size=hparams["n_vocab"],
            n_positions=hparams["n_ctx"],
            eos_token_id=hparams["n_vocab"] - 1,  # OpenAI's vocab ends with <|endoftext|>
        )

    @classmethod
    def from_json(cls, text: str) -> GPT2Config:
        """Build from a JSON object naming either our field names or a preset plus overrides.

        Example:
            >>> GPT2Config.from_json('{"preset": "gpt2", "n_layer": 2}').n_layer
            2
        """
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config is not valid JSON: {e}") from None
        except RecursionError:  # json recurses once per nesting level
            raise ValueError("model config is not valid JSON: nested too deeply") from None
        if not isinstance(fields, dict):
            raise ValueError(f"model config JSON must be an object, got {type(fields).__name__}")
        base = preset(str(fields.pop("preset"))) if "preset" in fields else cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown GPT2Config field(s) {sorted(unknown)}; known: {sorted(known)}")
        return dataclasses.replace(base, **fields)


def _is_int(value: object, minimum: int) -> bool:
    """A real int (bools are not) that is at least ``minimum``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


PRESETS: dict[str, GPT2Config] = {
    "gpt2": GPT2Config(),
    "gpt2-medium": GPT2Config(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": GPT2Config(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": GPT2Config(n_layer=48, n_embd=1600, n_head=25),
    "distilgpt2": GPT2Config(n_layer=6),
}


def preset(name: str) -> GPT2Config:
    """Look up a named size.

    Example:
        >>> preset("gpt2-xl").n_embd
        1600
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
