"""History: reading, saving, importing, exporting and searching a chat's messages.

Saved and imported messages use OpenAI's chat `messages` format: `role`, `content`
(a string, or text parts that are joined; `null` only on an assistant message with
`tool_calls`), `name`, `tool_calls` and `tool_call_id`.
"""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

from app.schemas.chat import ChatCreate
from app.schemas.common import Input, ListParams, SafeText, UnixTime

MAX_IMPORT_MESSAGES = 10_000
MAX_SAVE_MESSAGES = 1_000
MAX_TOOL_CALLS = 128
MAX_CONTENT_CHARS = 1_000_000
MAX_CONTENT_PARTS = 100

Role = Literal["system", "user", "assistant", "tool"]
ToolCallId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:\-]+$")]
FunctionName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
ParticipantName = Annotated[SafeText, Field(min_length=1, max_length=64)]


def _join_text_parts(value: list[Any]) -> str:
    """OpenAI also takes content as text parts; they are stored as the one string they make."""
    if len(value) > MAX_CONTENT_PARTS:
        raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts")
    texts = []
    for part in value:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ValueError('only text parts ({"type": "text", "text": "..."}) can be stored')
        if set(part) != {"type", "text"}:
            raise ValueError("a text part has only `type` and `text`")
        texts.append(part["text"])
    return "".join(texts)


MessageContent = Annotated[SafeText, Field(max_length=MAX_CONTENT_CHARS)]


class FunctionCall(Input):
    name: FunctionName
    arguments: Annotated[SafeText, Field(max_length=MAX_CONTENT_CHARS)] = Field(
        description="The arguments as the model wrote them (JSON text, kept as is)"
    )


class ToolCall(Input):
    id: ToolCallId
    type: Literal["function"] = "function"
    function: FunctionCall


class HistoryMessage(Input):
    """One message in OpenAI's chat format."""

    role: Role
    content: MessageContent | None = None
    name: ParticipantName | None = None
    tool_calls: Annotated[list[ToolCall], Field(min_length=1, max_length=MAX_TOOL_CALLS)] | None = None
    tool_call_id: ToolCallId | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_parts(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("content"), list):
            return data | {"content": _join_text_parts(data["content"])}
        return data

    @model_validator(mode="after")
    def _fields_fit_the_role(self) -> "HistoryMessage":
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have `tool_calls`")
        if self.role == "tool":
            if self.tool_call_id is None:
                raise ValueError("a tool message needs the `tool_call_id` it answers")
            if self.name is not None:
                raise ValueError("a tool message has no `name`")
        elif self.tool_call_id is not None:
            raise ValueError("only tool messages have a `tool_call_id`")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` may be null only on an assistant message with `tool_calls`")
        if self.tool_calls is not None and len({c.id for c in self.tool_calls}) != len(self.tool_calls):
            raise ValueError("tool call ids must be unique within a message")
        return self


class HistorySave(Input):
    messages: Annotated[list[HistoryMessage], Field(min_length=1, max_length=MAX_SAVE_MESSAGES)] = Field(
        description=f"Appended in this order, after the chat's last message (1 to {MAX_SAVE_MESSAGES})"
    )


class HistoryImport(ChatCreate):
    """A whole chat: the chat's fields, and its transcript.

    `system_prompt` is the chat's own; system messages in `messages` stay messages where they are.
    """

    messages: Annotated[list[HistoryMessage], Field(max_length=MAX_IMPORT_MESSAGES)] = Field(
        description=f"The transcript, oldest first (up to {MAX_IMPORT_MESSAGES})"
    )


class HistoryParams(ListParams):
    """Messages are read oldest first unless asked otherwise."""

    order: Literal["asc", "desc"] = Field(default="asc")
    branch: Annotated[SafeText, Field(max_length=64)] | None = Field(
        default=None,
        description="Omitted: the chat's current branch; `all`: every message; a message id: the branch ending there",
    )


class ExportParams(BaseModel):
    format: Literal["json", "markdown"] = Field(
        default="json", description="`json`: a body for the import route; `markdown`: for people"
    )


MAX_SEARCH_LIMIT = 50


class SearchParams(BaseModel):
    q: Annotated[SafeText, Field(min_length=1, max_length=256)] = Field(
        description="Words to find; every word must match. Taken literally: no operators, wildcards or quotes"
    )
    limit: int = Field(default=20, ge=1, le=MAX_SEARCH_LIMIT, description=f"1 to {MAX_SEARCH_LIMIT}")


class SearchHit(BaseModel):
    object: Literal["history.search_hit"] = "history.search_hit"
    chat_id: str
    message_id: str | None = Field(description="null when the chat's title matched")
    role: Literal["system", "user", "assistant", "tool"] | None
    snippet: str = Field(description="Plain text around the match; matched words are wrapped in `**`")
    score: float = Field(description="Higher is better; comparable within one response only")
    created_at: UnixTime


class SearchResults(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]
    has_more: bool


class HistoryCleared(BaseModel):
    id: str = Field(description="The chat, which is kept")
    object: Literal["chat.history.deleted"] = "chat.history.deleted"
    deleted: Literal[True] = True
    deleted_messages: int
