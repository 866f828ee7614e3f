"""Users, API keys and the caller."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, Field, field_validator

from app.schemas.common import Input, ModelName, SafeText, UnixTime

Role = Literal["user", "admin"]


class UserCreate(Input):
    name: Annotated[SafeText, Field(min_length=1, max_length=256)]
    role: Role = "user"


class UserRead(BaseModel):
    id: str
    object: Literal["user"] = "user"
    name: str
    role: Role
    created_at: UnixTime


RpmLimit = Annotated[int, Field(ge=1, le=10_000_000, description="Requests per minute (UTC minute)")]
TpmLimit = Annotated[int, Field(ge=1, le=2_000_000_000, description="Input + output tokens per minute")]
Budget = Annotated[Decimal, Field(ge=0, le=10_000_000, decimal_places=10, description="USD per UTC calendar month")]


class KeyLimits(Input):
    """A key's limits; null (or absent) means none."""

    rpm_limit: RpmLimit | None = None
    tpm_limit: TpmLimit | None = None
    budget_usd: Budget | None = None


class ApiKeyCreate(KeyLimits):
    name: Annotated[SafeText, Field(max_length=256)] | None = None
    allowed_models: Annotated[list[ModelName], Field(min_length=1, max_length=64)] | None = None
    expires_at: AwareDatetime | None = Field(default=None, description="Unix seconds or ISO 8601")

    @field_validator("expires_at")
    @classmethod
    def _in_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError("must be in the future")
        return value


class ApiKeyRead(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    user_id: str
    name: str | None
    prefix: str
    allowed_models: list[str] | None
    rpm_limit: int | None
    tpm_limit: int | None
    budget_usd: float | None
    expires_at: UnixTime | None
    revoked_at: UnixTime | None
    created_at: UnixTime


class ApiKeyCreated(ApiKeyRead):
    key: str = Field(description="The secret. Shown this once only.")


class MeRead(BaseModel):
    object: Literal["me"] = "me"
    user: UserRead | None
    role: Role
    key_id: str
    key_name: str | None
    allowed_models: list[str] | None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    budget_usd: float | None = None
