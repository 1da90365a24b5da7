"""The OpenAI request bodies `moemerge serve` accepts, and its errors in OpenAI's shape.

Kept apart from the server so that the HTTP adapter (tools/serve.py) reads as routes only: bodies are
validated here (wrong JSON types, lone surrogates and parameters we do not support are 400s, named), and
a refusal carries what OpenAI's error object needs.
"""

# No `from __future__ import annotations` here: FastAPI reads these models' annotations at runtime.

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moemerge.tools.engine import SEED_RANGE, Engine, RequestRefused, SamplingParams


class RequestError(Exception):
    """A request the server refuses: becomes OpenAI's error JSON with a 4xx (or 5xx) status."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type_

    @classmethod
    def refused(cls, exc: RequestRefused) -> "RequestError":
        """The engine's refusal as OpenAI reports a bad request: 400, invalid_request_error."""
        return cls(exc.message, exc.param, exc.code)


class _Strict(BaseModel):
    # wrong JSON types are errors (no "0.5" for 0.5); fields OpenAI has and we do not use are ignored
    model_config = ConfigDict(strict=True, extra="ignore")

    @field_validator("*")
    @classmethod
    def _real_text(cls, value: Any) -> Any:
        """JSON can carry a lone surrogate escape (\\ud800), which no tokenizer can encode: a 400, not a 500."""
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError("holds a lone surrogate escape (such as \\ud800), which is not text") from None
        return value


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class RoutingBody(_Strict):
    """A request's `routing` object (moemerge's own field): each value overrides the server's default."""

    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt key would silently route otherwise
    mode: str | None = None  # "token" or "request"
    top_k: int | None = None  # experts per request (request mode)
    mixing: str | None = None  # "router" or "fixed" (request mode, top_k > 1)
    experts: list[str] | None = None  # force these experts (implies request mode and top_k = their number)


# Accepted so that clients sending them get a clear 400 instead of silently different output.
UNSUPPORTED = (
    "logprobs",
    "top_logprobs",
    "tools",
    "functions",
    "logit_bias",
    "frequency_penalty",
    "presence_penalty",
    "best_of",
    "echo",
    "suffix",
)


def _is_neutral(name: str, value: Any) -> bool:
    """Whether an unsupported parameter holds a value that changes nothing (clients often send defaults)."""
    if value is None or value is False or (isinstance(value, str | list | dict) and not value):
        return True
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value == (1 if name == "best_of" else 0)
    return False


class RequestBody(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: Any = None
    top_logprobs: Any = None
    tools: Any = None
    functions: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None
    response_format: Any = None
    routing: RoutingBody | None = None

    def sampling(self, engine: Engine) -> SamplingParams:
        if self.n != 1:
            raise RequestError(f"n={self.n}: this server returns exactly one choice per request (n=1)", "n")
        for name in UNSUPPORTED:
            if not _is_neutral(name, getattr(self, name)):
                raise RequestError(f"{name} is not supported by moemerge serve", name, "unsupported_parameter")
        if self.response_format not in (None, {"type": "text"}):
            raise RequestError("response_format: only text is supported", "response_format", "unsupported_parameter")
        top_k = self.top_k if self.top_k is None else max(0, self.top_k)
        return engine.params(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=top_k,
            stop=self.stop,
            seed=self.seed,
        )


class ChatRequest(RequestBody):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens


class CompletionRequest(RequestBody):
    prompt: str


def plain_messages(messages: list[Message]) -> list[dict[str, str]]:
    plain = []
    for i, message in enumerate(messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise RequestError("only text content parts are supported", f"messages.{i}.content")
            content = "".join(part.text for part in content)
        plain.append({"role": message.role, "content": content or ""})
    return plain


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
