"""How a job samples: each parameter's service default and allowed range, the one source of both.

The API's wire models declare their sampling fields with the types below, so a value out of
range is a 400 naming the wire field, and leave a field the request did not set as None; their
`to_sampling()` then builds a `Sampling`, whose defaults fill in the rest (as vLLM's
`to_sampling_params()` takes its defaults from one place). The worker turns it into the engine's
`SamplingParams` with `to_params()`.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

from model.types import SamplingParams

# What a request that names no token budget gets; api/serving/caps.py lowers it to MAX_TOKENS_LIMIT.
DEFAULT_MAX_TOKENS = 512
MAX_STOPS = 4  # stop sequences, as OpenAI allows
MAX_LOGIT_BIAS = 300  # entries in logit_bias, as OpenAI allows
LOGIT_BIAS_BOUND = 100.0  # each bias is in [-100, 100], as OpenAI's

# The ranges, as OpenAI documents them (the budgets' upper bound is the MAX_TOKENS_LIMIT setting,
# and n's the MAX_N setting, both checked by the endpoints).
MaxTokens = Annotated[int, Field(ge=1)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Seed = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # int64, as OpenAI documents it
Choices = Annotated[int, Field(ge=1)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
Bias = Annotated[float, Field(ge=-LOGIT_BIAS_BOUND, le=LOGIT_BIAS_BOUND)]
TopLogprobs = Annotated[int, Field(ge=0, le=20)]
# --- not in the OpenAI spec: vLLM's extensions, with vLLM's ranges ---
TopK = Annotated[int, Field(ge=-1, le=2**31 - 1)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0)]


class Sampling(BaseModel):
    """A job's sampling parameters; a field a request left out has the service's default here."""

    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS
    temperature: Temperature = 0.6
    top_p: TopP = 0.9
    seed: Seed | None = None
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOPS)
    grammar: str | None = None  # structured outputs: an llguidance grammar (api/serving/structured.py)
    n: Choices = 1  # choices, each a sequence of the batch
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[int, Bias] = Field(default_factory=dict, max_length=MAX_LOGIT_BIAS)
    logprobs: bool = False
    top_logprobs: TopLogprobs = 0
    # --- not in the OpenAI spec: vLLM's extensions, with vLLM's meanings and defaults ---
    ignore_eos: bool = False  # generate max_tokens regardless of end-of-turn tokens
    top_k: TopK = -1  # keep the k likeliest tokens; -1 (or 0): all
    min_p: MinP = 0.0  # drop tokens below min_p times the likeliest's
    repetition_penalty: RepetitionPenalty = 1.0  # >1 discourages prompt and output tokens

    def to_params(self) -> SamplingParams:
        """The engine's parameters: the same names, in the engine's immutable types."""
        fields = self.model_dump(exclude={"n"})  # n is how many sequences the worker starts
        fields.update(
            stop=tuple(self.stop),
            logit_bias=tuple(sorted(self.logit_bias.items())),
            top_k=max(self.top_k, 0),  # the engine's "all" is 0 alone
        )
        return SamplingParams(**fields)
