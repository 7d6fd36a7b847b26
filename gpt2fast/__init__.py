"""gpt2fast: a GPT-2 inference engine whose hot path is our own kernels.

Example:
    >>> from gpt2fast import LLM, SamplingParams
    >>> llm = LLM('random:{"n_layer": 1, "n_embd": 32, "n_head": 2}')
    >>> len(llm.generate("Hello", SamplingParams(max_tokens=4))[0].outputs[0].token_ids)
    4
"""

from gpt2fast.config import PRESETS, GPT2Config
from gpt2fast.engine import LLM
from gpt2fast.errors import CheckpointError
from gpt2fast.outputs import CompletionOutput, GenerationError, RequestOutput
from gpt2fast.sampling import SamplingParams
from gpt2fast.trace import AttentionTrace, NextToken

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "GPT2Config", "PRESETS", "CheckpointError",
           "GenerationError", "AttentionTrace", "NextToken"]
__version__ = "0.1.0"
