"""Validate OpenLineage events against the OpenLineage JSON schemas shipped in tests/support/openlineage/.

`validate(event)` checks the event against ``OpenLineage.json`` (RunEvent),
then every facet against the schema its ``_schemaURL`` names: the standard
facets' own schema files, or petseg's custom facet schemas
(``petseg.lineage.openlineage.FACET_SCHEMAS``). References between the files
(``https://openlineage.io/spec/2-0-2/OpenLineage.json#/$defs/RunFacet``) are
resolved from the local copies: nothing is fetched.
"""

from __future__ import annotations

import json
import re
import uuid
from functools import cache
from pathlib import Path

from jsonschema import Draft202012Validator
from referencing import Registry, Resource

HERE = Path(__file__).resolve().parent / "openlineage"


@cache
def _registry() -> tuple[Registry, dict[str, dict]]:
    schemas = {}
    for path in [HERE / "OpenLineage.json", *sorted((HERE / "facets").glob("*.json"))]:
        schema = json.loads(path.read_text())
        schemas[schema["$id"]] = schema
    registry = Registry().with_resources((uri, Resource.from_contents(schema)) for uri, schema in schemas.items())
    return registry, schemas


def _validator(uri: str, pointer: str) -> Draft202012Validator:
    registry, _ = _registry()
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": f"{uri}#{pointer}"}
    return Draft202012Validator(schema, registry=registry, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _facets(event: dict):
    yield from (event.get("run", {}).get("facets") or {}).items()
    yield from (event.get("job", {}).get("facets") or {}).items()
    for dataset in [*event.get("inputs", []), *event.get("outputs", [])]:
        yield from (dataset.get("facets") or {}).items()
        yield from (dataset.get("inputFacets") or dataset.get("outputFacets") or {}).items()


def validate(event: dict) -> None:
    """Raise jsonschema's ValidationError (or AssertionError) unless the event and all its facets are valid."""
    from petseg.lineage.openlineage import FACET_SCHEMAS

    _, schemas = _registry()
    _validator("https://openlineage.io/spec/2-0-2/OpenLineage.json", "/$defs/RunEvent").validate(event)
    uuid.UUID(event["run"]["runId"])  # the "uuid" format is not checked by every jsonschema installation
    for name, facet in _facets(event):
        url = facet["_schemaURL"]
        custom = re.fullmatch(r"urn:petseg:openlineage:(\w+):1", url)
        if custom:
            Draft202012Validator(FACET_SCHEMAS[custom.group(1)]).validate(facet)
            continue
        document, _, pointer = url.partition("#")
        assert document in schemas, f"facet {name} names schema {url}, which tests/support/openlineage lacks"
        _validator(document, pointer).validate(facet)
