"""What generation returns, named as vLLM names it so code written for vLLM reads ours unchanged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sample of a request (cumulative: ``text`` and ``token_ids`` so far).

    ``logprobs[i]`` maps token ids to log-probabilities under the model for generated token ``i``:
    the chosen token plus the top ``SamplingParams.logprobs``. ``stop_reason`` is the stop string
    or stop token id that ended the sample, if one did.

    Example:
        >>> CompletionOutput(index=0, text=" world", token_ids=[995], finish_reason="length").text
        ' world'
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length" (max_tokens or context limit), "stop" (end/stop token or string), None
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its samples, in sample order.

    ``num_generated_tokens`` counts every sample's tokens, also those ``best_of`` ran and did not
    return (what a server bills as completion tokens); by default the tokens of ``outputs``.

    Example:
        >>> out = RequestOutput("0", "Hello", [15496], [CompletionOutput(0, " world", [995], "length")], True)
        >>> out.outputs[0].token_ids, out.num_generated_tokens
        ([995], 1)
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_generated_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.num_generated_tokens is None:
            self.num_generated_tokens = sum(len(o.token_ids) for o in self.outputs)
