"""What generation returns, named as vLLM names it so code written for vLLM reads ours unchanged."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sample of a request (cumulative: ``text`` and ``token_ids`` so far).

    ``logprobs[i]`` maps token ids to log-probabilities under the model for generated token ``i``:
    the chosen token plus the top ``SamplingParams.logprobs``. ``stop_reason`` is the stop string
    or stop token id that ended the sample, if one did. ``finish_reason="error"`` (as vLLM names it)
    means the model's logits went non-finite (NaN or infinity) for this request: ``error`` says so,
    and ``text``/``token_ids`` hold what came before. Its batch-mates are not affected.

    Example:
        >>> CompletionOutput(index=0, text=" world", token_ids=[995], finish_reason="length").text
        ' world'
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "length" (max_tokens or context limit), "stop" (end/stop token or string),
    # "error" (non-finite logits), None while running
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float | None = None
    stop_reason: str | int | None = None
    error: str | None = None  # why the sample failed, with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A request's prompt and its samples, in sample order.

    ``num_generated_tokens`` counts every sample's tokens, also those ``best_of`` ran and did not
    return (what a server bills as completion tokens); by default the tokens of ``outputs``.
    ``prompt_logprobs`` (a prompt-scoring request, ``Engine.add_scoring_request``): entry ``i`` maps
    prompt token ``i`` and the top-N tokens at position ``i`` to their log-probabilities given
    tokens ``0..i-1``; entry 0 is ``None`` (nothing precedes it), as vLLM returns them.
    ``prompt_ranks[i]`` is prompt token ``i``'s rank there (1 = likeliest; ``None`` for entry 0).

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
    prompt_logprobs: list[dict[int, float] | None] | None = None
    prompt_ranks: list[int | None] | None = None

    def __post_init__(self) -> None:
        if self.num_generated_tokens is None:
            self.num_generated_tokens = sum(len(o.token_ids) for o in self.outputs)

    @property
    def error(self) -> str | None:
        """The first failed sample's ``error`` (``finish_reason="error"``), or None.

        Example:
            >>> RequestOutput("0", None, [1], [CompletionOutput(0, "", [], "error", error="NaN")], True).error
            'NaN'
        """
        return next((s.error for s in self.outputs if s.finish_reason == "error"), None)


class GenerationError(RuntimeError):
    """``LLM.generate`` / ``LLM.stream``: a request failed at run time (its logits went non-finite).

    Raised once every request of the call has finished, so nothing is left running; ``outputs``
    holds the call's outputs (a failed sample has ``finish_reason="error"``), the others complete.

    Example:
        >>> e = GenerationError("request 'llm-3' failed", [])
        >>> str(e), e.outputs
        ("request 'llm-3' failed", [])
    """

    def __init__(self, message: str, outputs: list[RequestOutput]) -> None:
        super().__init__(message)
        self.outputs = outputs
