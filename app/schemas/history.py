"""History reads."""

from typing import Literal

from pydantic import Field

from app.schemas.common import ListParams


class HistoryParams(ListParams):
    """Messages are read oldest first unless asked otherwise."""

    order: Literal["asc", "desc"] = Field(default="asc")
