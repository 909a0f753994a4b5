"""Request bodies of the OpenAI routes (pydantic), with vLLM's extra sampling fields.

Only requests are pydantic models: they are validated once per request and a wrong body must become a
400 naming the field. Responses and stream chunks are built as plain dicts in ``responses.py`` (thousands
of chunks a second under load; their shapes are documented there).

Unknown fields are accepted and ignored, as vLLM does (clients send vendor fields freely); fields the
engine cannot honour are refused later, in ``params.py``, naming the field.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False        # vLLM's: usage in every chunk


class JsonSchema(_Body):
    name: str | None = None
    description: str | None = None
    # ``schema`` shadows a BaseModel attribute, hence the alias (the wire name stays "schema").
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None


class _SamplingFields(_Body):
    """Fields both routes share: OpenAI's sampling knobs and vLLM's extras (``None`` = not given)."""

    model: str | None = None                    # optional, as in vLLM: the served model when absent
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    # vLLM's extra request fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    spaces_between_special_tokens: bool | None = None


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: ``prompt`` is text, token ids, or a list of either (one choice set each)."""

    prompt: PromptType
    max_tokens: int | None = 16                 # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True             # vLLM's: BOS etc. added when tokenizing the prompt


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``: ``messages`` rendered with the model folder's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None               # deprecated by OpenAI, still sent by many clients
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    # vLLM's chat-template fields
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False            # the template already writes BOS
    chat_template_kwargs: dict[str, Any] | None = None
