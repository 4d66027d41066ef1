"""Rebuild openai-subset.yaml from OpenAI's published OpenAPI spec.

Usage: python tests/data/openapi/trim.py PATH/TO/openapi.yaml COMMIT > tests/data/openapi/openai-subset.yaml

PATH/TO/openapi.yaml is openapi.yaml of https://github.com/openai/openai-openapi at COMMIT.
Kept: the operations modelherd serves from it (below), their parameters and request bodies,
and every schema those reach. Dropped: response schemas (modelherd answers in llama-server's
superset, which the fuzz test does not check against them), the API-key security scheme
(the test daemon has no keys), and documentation-only keys. Needs PyYAML.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

OPERATIONS = {"/chat/completions": "post", "/completions": "post", "/embeddings": "post",
              "/models": "get", "/models/{model}": "get"}
DOC_KEYS = {"description", "summary", "title", "example", "examples", "x-oaiMeta", "x-oaiTypeLabel",
            "x-oaiExpandable"}


def strip(value: Any, field_names: bool = False) -> Any:
    """`value` without documentation keys; under `properties` the keys are field names, kept."""
    if isinstance(value, dict):
        return {k: strip(v, k == "properties" and not field_names) for k, v in value.items()
                if field_names or k not in DOC_KEYS}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def refs(value: Any, found: set[str]) -> None:
    if isinstance(value, dict):
        if isinstance(value.get("$ref"), str):
            found.add(value["$ref"])
        for v in value.values():
            refs(v, found)
    elif isinstance(value, list):
        for v in value:
            refs(v, found)


def main() -> None:
    source, commit = sys.argv[1], sys.argv[2]
    with open(source, encoding="utf-8") as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    paths: dict[str, Any] = {}
    todo: set[str] = set()
    for path, method in OPERATIONS.items():
        op = spec["paths"][path][method]
        kept = strip({k: op[k] for k in ("parameters", "requestBody") if k in op})
        kept["responses"] = {"200": {"description": "OK"}}
        paths[path] = {method: kept}
        refs(kept, todo)
    components: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    while todo:
        ref = todo.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, section, name = ref.removeprefix("#/").split("/")
        value = strip(spec["components"][section][name])
        components.setdefault(section, {})[name] = value
        refs(value, todo)
    version = spec["info"]["version"]
    subset = {"openapi": spec["openapi"], "info": {"title": "OpenAI API (subset)", "version": version},
              "servers": [{"url": "http://127.0.0.1/v1"}], "paths": paths,
              "components": {s: dict(sorted(v.items())) for s, v in sorted(components.items())}}
    operations = ", ".join(f"{m.upper()} {p}" for p, m in OPERATIONS.items())
    print("# A trimmed subset of OpenAI's OpenAPI spec: openapi.yaml of\n"
          f"# https://github.com/openai/openai-openapi at commit {commit}\n"
          f"# (OpenAI API version {version}; that repository is MIT-licensed), made by\n"
          "# tests/data/openapi/trim.py: the operations\n"
          f"# {operations},\n"
          "# their request schemas and every schema they reach; no response schemas, no security\n"
          "# scheme, no documentation keys. Used by tests/test_fuzz.py.")
    print(yaml.dump(subset, sort_keys=False, width=110, allow_unicode=True), end="")


if __name__ == "__main__":
    main()
