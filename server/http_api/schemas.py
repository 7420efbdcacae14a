"""The request bodies of the OpenAI-compatible API, validated with pydantic, and what each means for the service.

Parameters this server implements are fields. Every other parameter a client sends is looked at
by value (`unsupported`): one that would change the output (`n` > 1, `logprobs`, `tools`,
`logit_bias`, ...) is refused with 400 naming it, never silently ignored; its neutral value (`n`: 1,
`presence_penalty`: 0, `tools`: [] ...) and fields with no effect on the output (`user`, `metadata`)
pass. A misspelt parameter is unknown, so it is refused too.

Defaults follow OpenAI's: `temperature` 1 (sampling; send 0 for greedy), `top_p` 1. `max_tokens`
left out means the server's `--default-max-new-tokens`. vLLM's extra `top_k` is accepted (0 or -1:
off).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from softprompt.prompts.options import DecodingOptions

# Fields that change nothing a request returns: accepted whatever their value.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})

# The values of an unused list, map or flag that mean "not used".
_EMPTY: tuple[Any, ...] = (None, [], {}, False)

# Parameters this server does not implement: the values that mean "not used" (JSON values, compared as JSON does:
# `true` is not 1), and what to do instead. The server accepts exactly these and /openapi.json lists them, so the
# two cannot disagree.
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "n": ((None, 1), "this server makes one choice per prompt: send n=1 or leave it out"),
    "best_of": ((None, 1), "leave best_of out"),
    "echo": (_EMPTY, "echo is not supported: leave it out"),
    "logprobs": ((*_EMPTY, 0), "log-probabilities are not returned: leave logprobs out"),
    "top_logprobs": ((None, 0), "log-probabilities are not returned: leave top_logprobs out"),
    "suffix": ((None, ""), "insertion (suffix) is not supported: leave it out"),
    "presence_penalty": ((None, 0), "penalties are not supported: leave presence_penalty out"),
    "frequency_penalty": ((None, 0), "penalties are not supported: leave frequency_penalty out"),
    "repetition_penalty": ((None, 1), "penalties are not supported: leave repetition_penalty out"),
    "logit_bias": (_EMPTY, "logit_bias is not supported: leave it out"),
    "tools": (_EMPTY, "tool calling is not supported: leave tools out"),
    "tool_choice": ((None, "none"), "tool calling is not supported: leave tool_choice out"),
    "parallel_tool_calls": ((None,), "tool calling is not supported: leave parallel_tool_calls out"),
    "functions": (_EMPTY, "function calling is not supported: leave functions out"),
    "function_call": ((None, "none"), "function calling is not supported: leave function_call out"),
    "response_format": ((None, {"type": "text"}), "structured output is not supported: leave response_format out"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "audio": ((None,), "audio output is not supported: leave audio out"),
    "prediction": ((None,), "predicted outputs are not supported: leave prediction out"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported: leave it out"),
    "min_tokens": ((None, 0), "min_tokens is not supported: leave it out"),
    "ignore_eos": ((None, False), "ignore_eos is not supported: leave it out"),
}


def _same_json(a: Any, b: Any) -> bool:
    """Whether two decoded JSON values are equal as JSON sees them: 1 == 1.0, but true != 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def document_extras(schema: dict[str, Any]) -> None:
    """Adds the parameters `unsupported` accepts beside the fields to a body's JSON schema, and no others.

    The neutral parameters are listed with the values that pass (an `enum`), the ones without effect with any
    value; everything else is refused, so the schema says `additionalProperties: false`.
    """
    properties = schema.setdefault("properties", {})
    for name, (values, fix) in NEUTRAL.items():
        properties.setdefault(name, {"enum": list(values), "description": f"Not implemented: {fix}."})
    for name in sorted(NO_EFFECT):
        properties.setdefault(name, {"description": "Accepted; has no effect on the output."})
    schema["additionalProperties"] = False


class UnsupportedParameter(ValueError):
    """A parameter the server does not implement, set to a value that would change the output."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def unsupported(extra: dict[str, Any] | None) -> None:
    """Raises UnsupportedParameter for the first extra field that is neither neutral nor without effect."""
    for name, value in (extra or {}).items():
        if name in NO_EFFECT:
            continue
        if name not in NEUTRAL:
            raise UnsupportedParameter(name, f"unknown parameter {name!r}: this server does not implement it")
        values, fix = NEUTRAL[name]
        if not any(_same_json(value, neutral) for neutral in values):
            raise UnsupportedParameter(name, f"{name}={value!r} is not supported by this server: {fix}")


# A text that may not be empty, and a list of them that may not be empty either.
NonEmpty = Annotated[str, Field(min_length=1)]
NonEmptyList = Annotated[list[NonEmpty], Field(min_length=1)]


def _json_integer(value: Any) -> Any:
    """An integer as JSON Schema has it: a number with no fraction (5 or 5.0), never a boolean or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return value  # pydantic then takes 5.0 as 5 and refuses 5.5


# After an integer field's bounds (`Annotated[int, Field(ge=1), JSON_INTEGER]`): before them, pydantic would write
# the bounds into the JSON schema under its own names (`ge`), which no validator reads.
JSON_INTEGER = BeforeValidator(_json_integer)


class StreamOptions(BaseModel):
    """`stream_options`: a last chunk with the request's usage."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = Field(False, strict=True)


class _Sampling(BaseModel):
    """The decoding parameters both endpoints share."""

    model_config = ConfigDict(extra="allow", json_schema_extra=document_extras)

    # Numbers and flags are JSON's, as the schema says: `true` is no number, 1 no boolean and "5" no integer
    # (pydantic would take each for the other); 5.0 is the integer 5, as JSON Schema has it.
    model: str
    max_tokens: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None
    temperature: float | None = Field(None, ge=0, strict=True)
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    top_k: Annotated[int, Field(ge=-1), JSON_INTEGER] | None = None
    # Up to 2**53 - 1, the largest integer every JSON reader holds exactly (as a float64): a bound such as int64's
    # 2**63 - 1 rounds to 2**63 in a validator that reads numbers as floats, so the schema and the server would
    # disagree at the edge.
    seed: Annotated[int, Field(ge=0, le=2**53 - 1), JSON_INTEGER] | None = None
    stop: str | list[str] | None = None
    stream: bool = Field(False, strict=True)
    stream_options: StreamOptions | None = None
    # vLLM's extra field: lower is served first; None: the task's default (--task-policy). The token's role
    # bounds how urgent it may be (403 beyond).
    priority: Annotated[int, Field(ge=-(2**31), lt=2**31), JSON_INTEGER] | None = None

    def decoding(self, *, chat: bool = False) -> DecodingOptions:
        """The service's decoding options (0 meaning the server's default or off, as the service reads them)."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return DecodingOptions(
            max_new_tokens=self.max_new_tokens or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=max(0, self.top_k or 0),
            top_p=0.0 if self.top_p is None or self.top_p == 1 else self.top_p,
            seed=self.seed,
            stop=stop,
            chat=chat,
        )

    @property
    def max_new_tokens(self) -> int | None:
        """The most tokens to generate; None: the server's default."""
        return self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: one choice per prompt."""

    # Empty input is refused, as on gRPC: a request with no text is a mistake, whatever the task.
    prompt: NonEmpty | NonEmptyList = Field(description="the text to complete, or a list of texts (one choice "
                                                          "each); never empty")

    @property
    def prompts(self) -> list[str]:
        """The prompts, one choice each."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(BaseModel):
    """One part of a message's content; only text parts are supported."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One turn of a conversation."""

    model_config = ConfigDict(extra="allow", json_schema_extra=document_extras)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`: the conversation through the model's chat template."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1), JSON_INTEGER] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        """`max_completion_tokens` (OpenAI's newer name), else `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The name of the field `max_new_tokens` came from, to name it in an error."""
        return "max_completion_tokens" if self.max_completion_tokens else "max_tokens"

    @property
    def turns(self) -> tuple[tuple[str, str], ...]:
        """(role, content) turns; `developer` is OpenAI's newer name for `system`."""
        return tuple(("system" if m.role == "developer" else m.role, m.text) for m in self.messages)


class ClassifyRequest(BaseModel):
    """`POST /v1/classify`: which of the candidate labels the task's prompt makes most likely, per input."""

    model_config = ConfigDict(extra="allow", json_schema_extra=document_extras)
    model: str
    input: NonEmpty | NonEmptyList = Field(description="the text to classify, or a list of texts (one result "
                                                         "each); never empty")
    labels: list[str] = Field(min_length=2)
    apply_chat_template: bool = Field(False, strict=True)

    @property
    def inputs(self) -> list[str]:
        """The inputs, one result each."""
        return [self.input] if isinstance(self.input, str) else list(self.input)
