"""Usage statistics, shaped like OpenAI's Usage API."""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from app.schemas.common import SafeText

BucketWidth = Literal["1m", "1h", "1d"]
GroupKey = Literal["model", "user_id", "api_key_id", "chat_id"]
BUCKET_SECONDS: dict[str, int] = {"1m": 60, "1h": 3600, "1d": 86400}
# OpenAI's defaults and maxima for the number of buckets in one page.
BUCKET_LIMITS: dict[str, tuple[int, int]] = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
CsvList = Annotated[SafeText, Field(max_length=2000)]
# Where latency percentiles come from: the ledger's values, or the rollups' histograms (within 20%).
PercentileSource = Literal["exact", "histogram"]
PERCENTILES_FIELD = Field(
    description="`exact`: from every call's value (`percentile_cont`). `histogram`: estimated from the hourly and "
    "daily rollups' log-scale histograms, within one bin (20%) of the exact value; used whenever a bucket holds a "
    "whole UTC hour, unless grouped or filtered by chat_id or in 1m buckets. Counts, tokens and cost are exact "
    "either way."
)


class UsageQuery(BaseModel):
    start_time: int | None = Field(default=None, ge=0, description="Unix seconds, inclusive; default 7 days ago")
    end_time: int | None = Field(default=None, ge=0, description="Unix seconds, exclusive; default now")
    bucket_width: BucketWidth = "1d"
    group_by: CsvList | None = Field(default=None, description="Comma-separated: model, user_id, api_key_id, chat_id")
    models: CsvList | None = Field(default=None, description="Comma-separated model names")
    user_ids: CsvList | None = Field(default=None, description="Comma-separated user ids (admin only)")
    api_key_ids: CsvList | None = None
    chat_ids: CsvList | None = None
    limit: int | None = Field(default=None, ge=1, description="Buckets per page: 1d up to 31, 1h 168, 1m 1440")
    page: Annotated[str, Field(max_length=32)] | None = Field(default=None, description="`next_page` of the last page")


class SummaryQuery(BaseModel):
    start_time: int | None = Field(default=None, ge=0)
    end_time: int | None = Field(default=None, ge=0)
    user_ids: CsvList | None = None


class UsageResult(BaseModel):
    object: Literal["usage.result"] = "usage.result"
    requests: int
    errors: int
    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    reasoning_tokens: int
    estimated_requests: int = Field(description="Requests whose tokens were counted here, not reported upstream")
    cost_usd: float
    unpriced_requests: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    model: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    chat_id: str | None = None


class UsageBucket(BaseModel):
    object: Literal["bucket"] = "bucket"
    start_time: int
    end_time: int
    results: list[UsageResult]


class UsagePage(BaseModel):
    object: Literal["page"] = "page"
    data: list[UsageBucket]
    has_more: bool
    next_page: str | None
    latency_percentiles: PercentileSource = PERCENTILES_FIELD


class Percentiles(BaseModel):
    p50: float | None
    p95: float | None
    p99: float | None


class ModelTotals(BaseModel):
    model: str
    requests: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UnpricedTokens(BaseModel):
    model: str
    input_tokens: int
    output_tokens: int


class UsageSummary(BaseModel):
    object: Literal["usage.summary"] = "usage.summary"
    start_time: int
    end_time: int
    requests: int
    errors: int
    error_rate: float
    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    reasoning_tokens: int
    estimated_requests: int
    cost_usd: float
    latency_ms: Percentiles
    time_to_first_token_ms: Percentiles
    latency_percentiles: PercentileSource = PERCENTILES_FIELD
    top_models: list[ModelTotals]
    unpriced: list[UnpricedTokens]
