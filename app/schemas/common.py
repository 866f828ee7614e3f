"""Building blocks shared by every schema: safe text, metadata, lists, deletions."""

from datetime import datetime
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer

T = TypeVar("T")


def _safe_text(value: str) -> str:
    # PostgreSQL cannot store NUL, and lone surrogates cannot be encoded as UTF-8:
    # refuse both up front rather than fail in the database.
    if "\x00" in value:
        raise ValueError("must not contain NUL (\\u0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (no unpaired surrogates)") from None
    return value


SafeText = Annotated[str, AfterValidator(_safe_text)]
UnixTime = Annotated[datetime, PlainSerializer(lambda dt: int(dt.timestamp()), return_type=int)]
MetadataKey = Annotated[SafeText, Field(min_length=1, max_length=64)]
MetadataValue = Annotated[SafeText, Field(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]
Tag = Annotated[SafeText, Field(min_length=1, max_length=64)]
Tags = Annotated[list[Tag], Field(max_length=16)]
ModelName = Annotated[SafeText, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:/@+-]+$")]

MAX_LIST_LIMIT = 100


class Input(BaseModel):
    """Request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Page(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Deleted(BaseModel):
    id: str
    object: str
    deleted: Literal[True] = True


class ListParams(BaseModel):
    """Cursor pagination, as OpenAI's list endpoints take it."""

    limit: int = Field(default=20, ge=1, le=MAX_LIST_LIMIT, description=f"1 to {MAX_LIST_LIMIT}")
    after: str | None = Field(default=None, max_length=64, description="An id from a previous page")
    order: Literal["asc", "desc"] = "desc"
