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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from softprompt.prompts.options import DecodingOptions

# Fields that change nothing a request returns: accepted whatever their value.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier"})


def _empty(value: Any) -> bool:
    return value is None or value == [] or value == {} or value is False


# Parameters this server does not implement, with the values that mean "not used", and what to do instead.
NEUTRAL: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v in (None, 1), "this server makes one choice per prompt: send n=1 or leave it out"),
    "best_of": (lambda v: v in (None, 1), "leave best_of out"),
    "echo": (_empty, "echo is not supported: leave it out"),
    "logprobs": (lambda v: _empty(v) or v == 0, "log-probabilities are not returned: leave logprobs out"),
    "top_logprobs": (lambda v: v in (None, 0), "log-probabilities are not returned: leave top_logprobs out"),
    "suffix": (lambda v: v in (None, ""), "insertion (suffix) is not supported: leave it out"),
    "presence_penalty": (lambda v: v in (None, 0), "penalties are not supported: leave presence_penalty out"),
    "frequency_penalty": (lambda v: v in (None, 0), "penalties are not supported: leave frequency_penalty out"),
    "repetition_penalty": (lambda v: v in (None, 1), "penalties are not supported: leave repetition_penalty out"),
    "logit_bias": (_empty, "logit_bias is not supported: leave it out"),
    "tools": (_empty, "tool calling is not supported: leave tools out"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calling is not supported: leave tool_choice out"),
    "parallel_tool_calls": (lambda v: v is None, "tool calling is not supported: leave parallel_tool_calls out"),
    "functions": (_empty, "function calling is not supported: leave functions out"),
    "function_call": (lambda v: v in (None, "none"), "function calling is not supported: leave function_call out"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "structured output is not supported: leave response_format out"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is supported"),
    "audio": (lambda v: v is None, "audio output is not supported: leave audio out"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported: leave prediction out"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not supported: leave it out"),
    "min_tokens": (lambda v: v in (None, 0), "min_tokens is not supported: leave it out"),
    "ignore_eos": (lambda v: v in (None, False), "ignore_eos is not supported: leave it out"),
}


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
        ok, fix = NEUTRAL[name]
        if not ok(value):
            raise UnsupportedParameter(name, f"{name}={value!r} is not supported by this server: {fix}")


class StreamOptions(BaseModel):
    """`stream_options`: a last chunk with the request's usage."""

    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Sampling(BaseModel):
    """The decoding parameters both endpoints share."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    seed: int | None = Field(None, ge=0, lt=2**64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

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

    prompt: str | list[str]

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

    model_config = ConfigDict(extra="allow")
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
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def max_new_tokens(self) -> int | None:
        """`max_completion_tokens` (OpenAI's newer name), else `max_tokens`."""
        return self.max_completion_tokens or self.max_tokens

    @property
    def turns(self) -> tuple[tuple[str, str], ...]:
        """(role, content) turns; `developer` is OpenAI's newer name for `system`."""
        return tuple(("system" if m.role == "developer" else m.role, m.text) for m in self.messages)


class ClassifyRequest(BaseModel):
    """`POST /v1/classify`: which of the candidate labels the task's prompt makes most likely, per input."""

    model_config = ConfigDict(extra="allow")
    model: str
    input: str | list[str]
    labels: list[str] = Field(min_length=2)
    apply_chat_template: bool = False

    @property
    def inputs(self) -> list[str]:
        """The inputs, one result each."""
        return [self.input] if isinstance(self.input, str) else list(self.input)
