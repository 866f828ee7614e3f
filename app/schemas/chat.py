"""Chats, messages and sending."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool

from app.schemas.common import Input, Metadata, ModelName, SafeText, Tags, UnixTime
from app.schemas.context import ContextSettings

Title = Annotated[SafeText, Field(max_length=512)]
SystemPrompt = Annotated[SafeText, Field(max_length=200_000)]
Content = Annotated[SafeText, Field(min_length=1, max_length=1_000_000)]
StopWord = Annotated[SafeText, Field(min_length=1, max_length=256)]


class ChatParams(Input):
    """Generation parameters passed to the model with every send."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: StopWord | Annotated[list[StopWord], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None

    def upstream(self) -> dict[str, Any]:
        """The parameters as OpenAI's chat completions API names them."""
        params = self.model_dump(exclude_none=True)
        if "max_tokens" in params:
            params["max_completion_tokens"] = params.pop("max_tokens")
        return params


class ChatCreate(Input):
    title: Title | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    instructions: SystemPrompt | None = Field(default=None, description="Standing instructions for this chat")
    params: ChatParams = Field(default_factory=ChatParams)
    context: ContextSettings = Field(default_factory=ContextSettings)
    metadata: Metadata = Field(default_factory=dict)
    tags: Tags = Field(default_factory=list)
    pinned: StrictBool = False


class ChatUpdate(Input):
    """Only the fields sent change; `null` clears a nullable field."""

    title: Title | None = None
    model: ModelName | None = None
    system_prompt: SystemPrompt | None = None
    instructions: SystemPrompt | None = None
    params: ChatParams | None = None
    context: ContextSettings | None = None
    metadata: Metadata | None = None
    tags: Tags | None = None
    archived: StrictBool | None = None
    pinned: StrictBool | None = None


class ChatRead(BaseModel):
    id: str
    object: Literal["chat"] = "chat"
    title: str | None
    model: str = Field(description="The model the next send uses")
    system_prompt: str | None
    instructions: str | None
    params: dict[str, Any]
    context: dict[str, Any] = Field(description="strategy (effective), max_context_tokens, reserve_tokens")
    metadata: dict[str, str]
    tags: list[str]
    archived: bool
    pinned: bool
    message_count: int
    created_at: UnixTime
    updated_at: UnixTime


class ChatListParams(BaseModel):
    archived: bool | None = Field(default=None, description="Only archived (true) or active (false) chats")
    pinned: bool | None = None
    tag: Annotated[SafeText, Field(max_length=64)] | None = None
    q: Annotated[SafeText, Field(max_length=256)] | None = Field(default=None, description="Words in the title")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    """Token usage with OpenAI's chat-completions names."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = Field(default_factory=CompletionTokensDetails)
    source: Literal["reported", "estimated"] = Field(
        default="reported", description="`estimated`: counted by this service because the upstream did not report"
    )


class MessageRead(BaseModel):
    id: str
    object: Literal["chat.message"] = "chat.message"
    chat_id: str
    parent_id: str | None
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    status: Literal["complete", "partial", "error"]
    model: str | None
    finish_reason: str | None
    usage: Usage | None
    error: dict[str, Any] | None
    pinned: bool = False
    active: bool = Field(default=True, description="On the chat's current branch")
    tokens: int | None = Field(default=None, description="This message's tokens in chat format, counted when stored")
    context_messages: int | None = Field(default=None, description="On replies: messages in the context sent")
    context_tokens: int | None = Field(default=None, description="On replies: tokens of the context sent")
    created_at: UnixTime
    name: str | None = Field(default=None, description="The participant's name, as OpenAI's `name`")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="An assistant message's tool calls, in OpenAI's shape"
    )
    tool_call_id: str | None = Field(default=None, description="On a `tool` message: the call it answers")


class MessageUpdate(Input):
    """Pin a message, or give a user message new content: a sibling branch, answered at once with `reply`."""

    pinned: StrictBool | None = Field(default=None, description="Keep this message in every context")
    content: Content | None = Field(default=None, description="New content for a user message (a sibling branch)")
    reply: StrictBool = Field(default=False, description="With new content: get the model's reply to it")
    stream: StrictBool = Field(default=False, description="With reply: stream it as server-sent events")


class RegenerateRequest(Input):
    stream: StrictBool = False
    model: ModelName | None = None
    params: ChatParams | None = None


class MessageCreate(Input):
    content: Content
    stream: StrictBool = False
    model: ModelName | None = Field(default=None, description="Overrides the chat's model for this send")
    params: ChatParams | None = Field(default=None, description="Overrides the chat's params for this send")


class SendResult(BaseModel):
    object: Literal["chat.exchange"] = "chat.exchange"
    user_message: MessageRead
    assistant_message: MessageRead
    usage: Usage | None
