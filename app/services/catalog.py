"""The model catalog: context windows, output limits, prices and tokenizers, shipped as data.

`app/data/models.json` lists each model under its API name with `context_window`,
`max_output_tokens`, `encoding` (the tiktoken encoding, null when not an OpenAI tokenizer),
`pricing` (USD per 1M tokens: `input`, `cached_input`, `output`; null = unpriced) and optional
`aliases`. A name not in the file resolves to the entry whose name (or alias) is its longest
prefix ending at a "-": dated snapshots such as `gpt-4o-2024-08-06` resolve to `gpt-4o`, and a
snapshot that is priced differently (`gpt-4o-2024-05-13`) gets an entry of its own. Names are
matched case-insensitively. Anything else gets a fallback built from the catalog's defaults,
with `known=False` and no price.

Operators can add or change models with an override file of the same shape: its top-level
fields are optional, and each of its entries is merged field by field over the shipped entry of
that name (inside `pricing` too), or, for a new name, must be complete.

Updating `models.json` (hand-maintained; there is no generator):
1. Open OpenAI's pricing page (platform.openai.com/docs/pricing, Standard tier, text tokens) and
   the model pages (platform.openai.com/docs/models/<name>) for context window and max output.
2. Edit or add entries; `cached_input: null` when a model has no cached-input discount. Give a
   dated snapshot its own entry only when its numbers differ from its base model's.
3. Set `as_of` to the date the pages were read and bump `version` (`YYYY-MM-DD.N`): usage records
   store it as the source of the prices they were costed with.
4. Run `pytest tests/test_catalog.py`: it loads and validates the file and checks each entry's
   `encoding` against the tokenizer's own model mapping.
"""

import copy as copy_module
import hashlib
import json
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, Literal, Self, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CATALOG_PATH: Final = Path(__file__).resolve().parent.parent / "data" / "models.json"
DEFAULT_CONTEXT_WINDOW: Final = 8192
DEFAULT_MAX_OUTPUT_TOKENS: Final = 4096

_PER_TOKENS: Final = 6  # prices are per 10**6 tokens

EncodingName = Literal["o200k_base", "cl100k_base"]

_M = TypeVar("_M", bound=BaseModel)


class CatalogError(ValueError):
    """A catalog file is missing or invalid; the message names the file and the field."""


class Pricing(BaseModel):
    """Prices in USD per 1M tokens. `cached_input` None: cached tokens cost the `input` rate."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Decimal = Field(ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    output: Decimal = Field(ge=0)


class ModelEntry(BaseModel):
    """One model as written in the catalog file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    encoding: EncodingName | None
    pricing: Pricing | None
    aliases: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _output_fits_window(self) -> Self:
        if self.max_output_tokens > self.context_window:
            raise ValueError("max_output_tokens must not exceed context_window")
        return self


class CatalogFile(BaseModel):
    """The shipped catalog file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str = Field(min_length=1)
    source: str = Field(min_length=1)
    as_of: str = Field(min_length=1)
    models: dict[str, ModelEntry]


class _PricingPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Decimal | None = Field(default=None, ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    output: Decimal | None = Field(default=None, ge=0)


class _ModelPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    encoding: EncodingName | None = None
    pricing: _PricingPatch | None = None
    aliases: tuple[str, ...] | None = None


class _OverrideFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(default=None, min_length=1)
    source: str | None = Field(default=None, min_length=1)
    as_of: str | None = Field(default=None, min_length=1)
    models: dict[str, _ModelPatch] = Field(default_factory=dict)


class ModelInfo(BaseModel):
    """What the service knows about a model; `known=False` marks a fallback from defaults."""

    model_config = ConfigDict(frozen=True)

    id: str
    known: bool
    context_window: int
    max_output_tokens: int
    encoding: EncodingName | None
    pricing: Pricing | None

    @property
    def priced(self) -> bool:
        """Whether a cost can be computed for this model."""
        return self.pricing is not None

    def cost(self, input_tokens: int, cached_tokens: int, output_tokens: int) -> Decimal | None:
        """Exact cost in USD, or None if unpriced.

        `cached_tokens` are part of `input_tokens` (as in OpenAI's usage) and billed at the cached
        rate; reasoning tokens are part of `output_tokens` and billed as output.
        """
        if min(input_tokens, cached_tokens, output_tokens) < 0:
            raise ValueError("token counts must not be negative")
        if cached_tokens > input_tokens:
            raise ValueError("cached_tokens are part of input_tokens and cannot exceed them")
        if self.pricing is None:
            return None
        p = self.pricing
        cached_rate = p.input if p.cached_input is None else p.cached_input
        micro_usd = (input_tokens - cached_tokens) * p.input + cached_tokens * cached_rate + output_tokens * p.output
        return micro_usd.scaleb(-_PER_TOKENS)


class ModelCatalog:
    """Model limits and prices; load once (the app keeps it on `app.state`), then read-only."""

    def __init__(
        self,
        models: Mapping[str, ModelEntry],
        *,
        version: str,
        source: str,
        as_of: str,
        default_context_window: int = DEFAULT_CONTEXT_WINDOW,
        default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
    ) -> None:
        if default_context_window <= 0 or default_max_output_tokens <= 0:
            raise ValueError("default_context_window and default_max_output_tokens must be positive")
        self._models = {
            name: ModelInfo(
                id=name,
                known=True,
                context_window=entry.context_window,
                max_output_tokens=entry.max_output_tokens,
                encoding=entry.encoding,
                pricing=entry.pricing,
            )
            for name, entry in models.items()
        }
        self._lookup = _lookup_table(models)
        self._version = version
        self._source = source
        self._as_of = as_of
        self._default_context_window = default_context_window
        self._default_max_output_tokens = min(default_max_output_tokens, default_context_window)

    @classmethod
    def load(
        cls,
        path: Path | None = None,
        overrides: Path | None = None,
        *,
        default_context_window: int = DEFAULT_CONTEXT_WINDOW,
        default_max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS,
    ) -> "ModelCatalog":
        """Read the catalog (default: the shipped `app/data/models.json`) and merge `overrides` over it.

        Raises `CatalogError` naming the file and field at fault. With overrides, `version` becomes
        `<shipped version>+<override version>` (or `+overrides.<sha256 prefix>` if it has none).
        """
        path = path or DEFAULT_CATALOG_PATH
        raw = _read_json(path)
        base = _validate(CatalogFile, raw, path)
        _check_names(base.models, path)
        models = dict(base.models)
        version, source, as_of = base.version, base.source, base.as_of
        if overrides is not None:
            raw_override = _read_json(overrides)
            patch = _validate(_OverrideFile, raw_override, overrides)
            models = _merge(models, patch, overrides)
            _check_names(models, overrides)
            tag = patch.version or "overrides." + hashlib.sha256(overrides.read_bytes()).hexdigest()[:12]
            version = f"{version}+{tag}"
            source = f"{source} Overridden by {overrides.name}" + (f": {patch.source}" if patch.source else ".")
            as_of = patch.as_of or as_of
        return cls(
            models,
            version=version,
            source=source,
            as_of=as_of,
            default_context_window=default_context_window,
            default_max_output_tokens=default_max_output_tokens,
        )

    def with_limits(self, model: str, *, context_window: int, max_output_tokens: int) -> "ModelCatalog":
        """A copy in which `model` (which must be known) has these limits: a server's own settings
        (like the local model's context size) win over the shipped numbers."""
        name = self.resolve(model)
        if name is None:
            raise CatalogError(f"model catalog: no model named {model!r} to set limits for")
        copy = copy_module.copy(self)
        copy._models = dict(self._models)
        copy._models[name] = self._models[name].model_copy(
            update={"context_window": context_window, "max_output_tokens": min(max_output_tokens, context_window)}
        )
        return copy

    @property
    def version(self) -> str:
        """The catalog's version: recorded with each cost as the price source."""
        return self._version

    @property
    def source(self) -> str:
        """Where the numbers come from."""
        return self._source

    @property
    def as_of(self) -> str:
        """The date the numbers were read from their source."""
        return self._as_of

    def models(self) -> list[ModelInfo]:
        """Every catalogued model, by name."""
        return [self._models[name] for name in sorted(self._models)]

    def resolve(self, model: str) -> str | None:
        """The catalog name `model` resolves to (exact name, alias, or longest "-" prefix), or None."""
        name = model.strip().lower()
        while True:
            found = self._lookup.get(name)
            if found is not None:
                return found
            name, sep, _ = name.rpartition("-")
            if not sep or not name:
                return None

    def get(self, model: str) -> ModelInfo:
        """The catalogued model `model` resolves to, or a fallback from the defaults (`known=False`)."""
        name = self.resolve(model)
        if name is not None:
            return self._models[name]
        return ModelInfo(
            id=model,
            known=False,
            context_window=self._default_context_window,
            max_output_tokens=self._default_max_output_tokens,
            encoding=None,
            pricing=None,
        )

    def price(self, model: str, input_tokens: int, cached_tokens: int, output_tokens: int) -> Decimal | None:
        """Exact cost in USD of one call (cached tokens are part of input tokens), None if unpriced."""
        return self.get(model).cost(input_tokens, cached_tokens, output_tokens)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"model catalog {path}: cannot read ({exc.strerror or exc})") from exc
    except UnicodeDecodeError as exc:
        raise CatalogError(f"model catalog {path}: not UTF-8 text") from exc
    try:
        # Decimal, not float, so that 0.075 is exactly 0.075.
        return json.loads(text, parse_float=Decimal, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"model catalog {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from exc
    except ValueError as exc:
        raise CatalogError(f"model catalog {path}: {exc}") from exc


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid number here")


def _validate(schema: type[_M], raw: Any, path: Path) -> _M:
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(f"model catalog {path}: {_describe(exc)}") from exc


def _describe(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> str:
    """Pydantic errors as `models.gpt-4o.pricing.input: message` lines."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in (*prefix, *err["loc"])) or "(top level)"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


def _merge(models: dict[str, ModelEntry], patch: _OverrideFile, path: Path) -> dict[str, ModelEntry]:
    """Shipped entries with the override file's entries merged over them, field by field."""
    merged = dict(models)
    canonical = {name.strip().lower(): name for name in merged}
    for key, change in patch.models.items():
        name = canonical.get(key.strip().lower(), key)
        fields = change.model_dump(exclude_unset=True)
        base = merged.get(name)
        if base is None:
            combined = fields
        else:
            combined = base.model_dump()
            if "pricing" in fields:
                pricing = fields.pop("pricing")
                # null makes the model unpriced; a partial object changes only the rates it names.
                combined["pricing"] = None if pricing is None else {**(combined["pricing"] or {}), **pricing}
            combined.update(fields)
        try:
            merged[name] = ModelEntry.model_validate(combined)
        except ValidationError as exc:
            raise CatalogError(f"model catalog {path}: {_describe(exc, ('models', key))}") from exc
    return merged


def _check_names(models: Mapping[str, ModelEntry], path: Path) -> None:
    """Every name and alias must be unique (case-insensitively) and non-empty."""
    seen: dict[str, str] = {}
    for name, entry in models.items():
        for key, field in ((name, f"models.{name}"), *((a, f"models.{name}.aliases") for a in entry.aliases)):
            norm = key.strip().lower()
            if not norm:
                raise CatalogError(f"model catalog {path}: {field}: empty model name")
            other = seen.get(norm)
            if other is not None and other != name:
                raise CatalogError(f"model catalog {path}: {field}: {key!r} is already used by models.{other}")
            seen[norm] = name


def _lookup_table(models: Mapping[str, ModelEntry]) -> dict[str, str]:
    """Normalized name or alias -> catalog name."""
    table: dict[str, str] = {}
    for name, entry in models.items():
        table[name.strip().lower()] = name
        for alias in entry.aliases:
            table[alias.strip().lower()] = name
    return table
