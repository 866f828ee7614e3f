import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from app.services.catalog import DEFAULT_CATALOG_PATH, CatalogError, ModelCatalog, ModelInfo, Pricing
from app.services.tokens import encoding_for_model

REQUIRED_MODELS = [
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4-turbo",
    "gpt-3.5-turbo",
    "o1",
    "o3",
    "o3-mini",
    "o4-mini",
    "gpt-5",
    "gpt-5-mini",
    "gpt-5-nano",
    "smollm2-135m-instruct",
]


@pytest.fixture(scope="module")
def catalog() -> ModelCatalog:
    return ModelCatalog.load()


def _write(path: Path, body: dict[str, Any]) -> Path:
    path.write_text(json.dumps(body), encoding="utf-8")
    return path


def test_shipped_catalog_has_the_required_models(catalog: ModelCatalog) -> None:
    for model in REQUIRED_MODELS:
        assert catalog.get(model).known is True
        assert catalog.get(model).id == model


def test_shipped_catalog_names_its_source_and_version(catalog: ModelCatalog) -> None:
    raw = json.loads(DEFAULT_CATALOG_PATH.read_text(encoding="utf-8"))
    assert catalog.version == raw["version"]
    assert catalog.source == raw["source"]
    assert catalog.as_of == raw["as_of"]


def test_catalog_encodings_agree_with_the_tokenizer(catalog: ModelCatalog) -> None:
    for info in catalog.models():
        assert info.encoding == encoding_for_model(info.id), info.id


def test_known_model_lookup(catalog: ModelCatalog) -> None:
    assert catalog.get("gpt-4o") == ModelInfo(
        id="gpt-4o",
        known=True,
        context_window=128000,
        max_output_tokens=16384,
        encoding="o200k_base",
        pricing=Pricing(input=Decimal("2.50"), cached_input=Decimal("1.25"), output=Decimal("10.00")),
    )


def test_local_model_is_free(catalog: ModelCatalog) -> None:
    info = catalog.get("smollm2-135m-instruct")
    assert (info.context_window, info.max_output_tokens, info.encoding) == (8192, 2048, None)
    assert catalog.price("smollm2-135m-instruct", 1000, 0, 1000) == Decimal(0)


@pytest.mark.parametrize(
    ("model", "resolved"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("gpt-4-0613", "gpt-4"),
        ("gpt-4-turbo-2024-04-09", "gpt-4-turbo"),
        ("gpt-4-1106-preview", "gpt-4-turbo"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),
        ("GPT-4o", "gpt-4o"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ],
)
def test_snapshots_and_aliases_resolve(catalog: ModelCatalog, model: str, resolved: str) -> None:
    assert catalog.resolve(model) == resolved
    assert catalog.get(model).id == resolved


def test_differently_priced_snapshot_has_its_own_price(catalog: ModelCatalog) -> None:
    assert catalog.price("gpt-4o-2024-05-13", 1_000_000, 0, 0) == Decimal("5.00")
    assert catalog.price("gpt-4o-2024-08-06", 1_000_000, 0, 0) == Decimal("2.50")


def test_unknown_model_falls_back_to_defaults(catalog: ModelCatalog) -> None:
    assert catalog.resolve("llama-3") is None
    assert catalog.get("llama-3") == ModelInfo(
        id="llama-3", known=False, context_window=8192, max_output_tokens=4096, encoding=None, pricing=None
    )
    assert catalog.price("llama-3", 100, 0, 100) is None


def test_prefix_match_needs_a_dash_boundary(catalog: ModelCatalog) -> None:
    assert catalog.get("gpt-4omni").known is False
    assert catalog.get("o10").known is False


def test_fallback_defaults_are_configurable() -> None:
    custom = ModelCatalog.load(default_context_window=32768, default_max_output_tokens=1024)
    info = custom.get("mistral-7b")
    assert (info.known, info.context_window, info.max_output_tokens) == (False, 32768, 1024)


def test_cost_is_exact(catalog: ModelCatalog) -> None:
    # 800 uncached * 2.50 + 200 cached * 1.25 + 500 output * 10.00, per 1M tokens
    assert catalog.price("gpt-4o", 1000, 200, 500) == Decimal("0.00725")
    # 0.075 and 0.15 are not exact binary floats; the sum still is exact
    assert catalog.price("gpt-4o-mini", 3, 1, 7) == Decimal("0.000004575")
    assert (
        catalog.price("gpt-4o-mini", 3, 1, 7) == (2 * Decimal("0.15") + Decimal("0.075") + 7 * Decimal("0.60")) / 10**6
    )


def test_cached_tokens_cost_the_input_rate_without_a_cached_price(catalog: ModelCatalog) -> None:
    assert catalog.price("gpt-4-turbo", 1000, 400, 0) == Decimal("0.01")


def test_cost_rejects_impossible_counts(catalog: ModelCatalog) -> None:
    with pytest.raises(ValueError, match="cannot exceed"):
        catalog.price("gpt-4o", 10, 11, 0)
    with pytest.raises(ValueError, match="negative"):
        catalog.price("gpt-4o", 10, 0, -1)


def test_override_changes_and_adds_models(tmp_path: Path, catalog: ModelCatalog) -> None:
    overrides = _write(
        tmp_path / "models.override.json",
        {
            "version": "acme-1",
            "models": {
                "gpt-4o": {"pricing": {"input": 2.0}, "context_window": 64000},
                "my-llama": {"context_window": 32768, "max_output_tokens": 4096, "encoding": None, "pricing": None},
            },
        },
    )
    merged = ModelCatalog.load(overrides=overrides)
    assert merged.version == f"{catalog.version}+acme-1"
    gpt4o = merged.get("gpt-4o-2024-08-06")
    assert (gpt4o.context_window, gpt4o.max_output_tokens) == (64000, 16384)
    assert gpt4o.pricing == Pricing(input=Decimal("2.0"), cached_input=Decimal("1.25"), output=Decimal("10.00"))
    assert merged.get("my-llama") == ModelInfo(
        id="my-llama", known=True, context_window=32768, max_output_tokens=4096, encoding=None, pricing=None
    )
    assert merged.price("my-llama", 10, 0, 10) is None
    assert merged.get("gpt-4o-mini") == catalog.get("gpt-4o-mini")


def test_override_without_version_is_tagged_by_content_hash(tmp_path: Path, catalog: ModelCatalog) -> None:
    overrides = _write(tmp_path / "o.json", {"models": {"o3": {"pricing": None}}})
    merged = ModelCatalog.load(overrides=overrides)
    assert merged.version.startswith(f"{catalog.version}+overrides.")
    assert len(merged.version) == len(catalog.version) + len("+overrides.") + 12
    assert merged.get("o3").pricing is None


def test_invalid_override_names_file_and_field(tmp_path: Path) -> None:
    overrides = _write(tmp_path / "bad.json", {"models": {"gpt-4o": {"pricing": {"output": -1}}}})
    with pytest.raises(
        CatalogError, match=r"models\.gpt-4o\.pricing\.output: Input should be greater than or equal to 0"
    ):
        ModelCatalog.load(overrides=overrides)
    with pytest.raises(CatalogError, match=r"bad\.json"):
        ModelCatalog.load(overrides=overrides)


def test_incomplete_new_model_in_override_names_missing_field(tmp_path: Path) -> None:
    overrides = _write(tmp_path / "new.json", {"models": {"my-model": {"context_window": 4096, "pricing": None}}})
    with pytest.raises(CatalogError, match=r"new\.json: models\.my-model\.max_output_tokens: Field required"):
        ModelCatalog.load(overrides=overrides)


def test_override_with_unknown_field_is_rejected(tmp_path: Path) -> None:
    overrides = _write(tmp_path / "typo.json", {"models": {"gpt-4o": {"context_windw": 1}}})
    with pytest.raises(CatalogError, match=r"models\.gpt-4o\.context_windw: Extra inputs are not permitted"):
        ModelCatalog.load(overrides=overrides)


def test_override_output_larger_than_window_is_rejected(tmp_path: Path) -> None:
    overrides = _write(tmp_path / "big.json", {"models": {"gpt-4o": {"max_output_tokens": 200000}}})
    with pytest.raises(CatalogError, match=r"models\.gpt-4o: Value error, max_output_tokens must not exceed"):
        ModelCatalog.load(overrides=overrides)


def test_override_alias_clash_is_rejected(tmp_path: Path) -> None:
    overrides = _write(tmp_path / "clash.json", {"models": {"gpt-4o-mini": {"aliases": ["gpt-4o"]}}})
    with pytest.raises(CatalogError, match=r"models\.gpt-4o-mini\.aliases: 'gpt-4o' is already used by models\.gpt-4o"):
        ModelCatalog.load(overrides=overrides)


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"models": {', encoding="utf-8")
    with pytest.raises(CatalogError, match=r"broken\.json: invalid JSON at line 1 column 13"):
        ModelCatalog.load(overrides=path)


def test_missing_catalog_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"nowhere\.json: cannot read"):
        ModelCatalog.load(tmp_path / "nowhere.json")


def test_shipped_file_shape_is_required_for_a_replacement_catalog(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.json", {"version": "1", "source": "me", "models": {}})
    with pytest.raises(CatalogError, match=r"mine\.json: as_of: Field required"):
        ModelCatalog.load(path)


def test_with_limits_overrides_one_models_window_and_keeps_its_prices() -> None:
    catalog = ModelCatalog.load()
    local = catalog.with_limits("smollm2-135m-instruct", context_window=2048, max_output_tokens=256)
    info = local.get("smollm2-135m-instruct")
    assert (info.context_window, info.max_output_tokens) == (2048, 256)
    assert info.pricing == catalog.get("smollm2-135m-instruct").pricing
    assert catalog.get("smollm2-135m-instruct").context_window == 8192
    assert local.get("gpt-4o").context_window == catalog.get("gpt-4o").context_window
