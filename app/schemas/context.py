"""Context settings, saved context, and the context dry run."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from app.schemas.common import Input, SafeText, UnixTime

SavedText = Annotated[SafeText, Field(max_length=100_000)]


class ContextSettings(Input):
    """How a chat fits its history into the model's window."""

    strategy: Literal["window", "summary", "none"] | None = Field(
        default=None, description="window: drop the oldest; summary: fold them into a summary; none: refuse"
    )
    max_context_tokens: int | None = Field(default=None, ge=1, le=10_000_000, description="Cap on everything sent")
    reserve_tokens: int | None = Field(default=None, ge=1, le=1_000_000, description="Room kept for the reply")


class SavedContextWrite(Input):
    content: SavedText


class SavedContextRead(BaseModel):
    object: Literal["user.context"] = "user.context"
    content: str
    updated_at: UnixTime | None


class BudgetRead(BaseModel):
    context_window: int
    reserve_tokens: int
    safety_margin: int
    max_context_tokens: int


class ContextPart(BaseModel):
    kind: Literal["system", "user_context", "instructions", "summary", "message"]
    message_id: str | None
    role: str
    tokens: int
    pinned: bool


class DroppedRead(BaseModel):
    reason: Literal["window", "summary_pending"]
    messages: int = Field(description="Messages below `before_seq` left out of the context")
    before_seq: int


class SummaryRead(BaseModel):
    id: str
    up_to_seq: int
    tokens: int
    created_at: UnixTime


class ContextRead(BaseModel):
    object: Literal["chat.context"] = "chat.context"
    chat_id: str
    model: str
    strategy: Literal["window", "summary", "none"]
    exact: bool = Field(description="False when the model's tokenizer is unknown and counts are estimates")
    budget: BudgetRead
    total_tokens: int = Field(description="Everything sent, with the 3 tokens that prime the reply")
    messages: list[ContextPart]
    summary: SummaryRead | None
    dropped: DroppedRead | None
