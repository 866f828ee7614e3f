"""Validate JSON against the schemas of OpenAI's official OpenAPI description.

The spec (`shared/openai-openapi/openapi.yaml`, beside the repository) is about
3 MB of YAML; `load_spec()` parses it once per process (libyaml's C loader when
present) and `OpenAPISchemas` validates instances against any schema under
`components/schemas`, resolving `#/components/schemas/...` references through a
`referencing` registry built from the spec itself.

OpenAPI 3.1 schemas are JSON Schema 2020-12; 3.0 schemas are a draft-4 dialect
with `nullable`. This spec says 3.1 but still carries 3.0's `nullable: true` in
places (SOURCE.md beside it), which a 2020-12 validator would ignore and so
reject `null` where the API sends it: `nullable: true` is rewritten into a
`null` alternative whatever the version. Nothing else is relaxed.
"""

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource, Specification
from referencing.jsonschema import DRAFT4, DRAFT202012

SPEC_ENV = "OPENAI_OPENAPI_SPEC"
DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai-openapi" / "openapi.yaml"
BASE_URI = "urn:openai-openapi"

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def spec_path() -> Path:
    """Where the spec is: `$OPENAI_OPENAPI_SPEC`, or `shared/` beside the repository."""
    return Path(os.environ.get(SPEC_ENV) or DEFAULT_SPEC)


def _nullable(node: Any) -> Any:
    """A copy of `node` with every 3.0-style `nullable: true` turned into a JSON Schema null alternative."""
    if isinstance(node, list):
        return [_nullable(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _nullable(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is not True:
        return out
    kind = out.get("type")
    if isinstance(kind, str) and "enum" not in out:
        out["type"] = [kind, "null"]
        return out
    if isinstance(kind, list) and "enum" not in out:
        out["type"] = [*kind, "null"] if "null" not in kind else kind
        return out
    return {"anyOf": [out, {"type": "null"}]}


class OpenAPISchemas:
    """The spec's `components/schemas`, ready to validate against."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        version = str(spec.get("openapi", ""))
        if version.startswith("3.1"):
            self.dialect: Specification[Any] = DRAFT202012
            self._validator_class: type[jsonschema.protocols.Validator] = jsonschema.Draft202012Validator
        elif version.startswith("3.0"):
            self.dialect = DRAFT4
            self._validator_class = jsonschema.Draft4Validator
        else:
            raise ValueError(f"not an OpenAPI 3.x document (openapi: {version!r})")
        self.version = version
        self.info_version = str(spec.get("info", {}).get("version", ""))
        self.schemas: dict[str, Any] = _nullable(spec["components"]["schemas"])
        root = {"components": {"schemas": self.schemas}}
        self.registry: Registry[Any] = Registry().with_resource(
            BASE_URI, Resource.from_contents(root, default_specification=self.dialect)
        )

    @functools.cache  # noqa: B019 - one instance per session; the validators are worth keeping
    def validator(self, name: str) -> jsonschema.protocols.Validator:
        """A validator for `components/schemas/<name>`."""
        if name not in self.schemas:
            raise KeyError(f"no schema {name!r} in the spec")
        return self._validator_class({"$ref": f"{BASE_URI}#/components/schemas/{name}"}, registry=self.registry)

    def errors(self, name: str, instance: Any) -> list[str]:
        """Every way `instance` violates the schema, as readable lines (empty: it conforms)."""
        found = sorted(self.validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found]

    def validate(self, name: str, instance: Any) -> None:
        """Raise AssertionError listing the violations if `instance` does not conform."""
        problems = self.errors(name, instance)
        if problems:
            raise AssertionError(f"{name} violated:\n" + "\n".join(problems))


def load_spec(path: Path | None = None) -> dict[str, Any]:
    """The parsed OpenAPI document (parsed once per process)."""
    return _load_spec(path or spec_path())


def openai_schemas(path: Path | None = None) -> OpenAPISchemas:
    """The spec's schemas (built once per process)."""
    return _schemas(path or spec_path())


@functools.cache
def _load_spec(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        spec = yaml.load(f, Loader=_Loader)
    if not isinstance(spec, dict):
        raise ValueError(f"{path} is not an OpenAPI document")
    return spec


@functools.cache
def _schemas(path: Path) -> OpenAPISchemas:
    return OpenAPISchemas(_load_spec(path))
