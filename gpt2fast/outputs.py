"""What generation returns, named as vLLM names it so code written for vLLM reads ours unchanged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sample of a request.

    Example:
        >>> CompletionOutput(index=0, text=" world", token_ids=[995], finish_reason="length").text
        ' world'
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length" (max_tokens or context limit), "stop" (end token), None while running


@dataclass
class RequestOutput:
    """A request's prompt and its samples.

    Example:
        >>> out = RequestOutput("0", "Hello", [15496], [CompletionOutput(0, " world", [995], "length")], True)
        >>> out.outputs[0].token_ids
        [995]
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
