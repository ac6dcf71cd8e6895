"""Generate the JSON Schemas and the spec reference in ``docs/`` from the pydantic models.

``python -m trainplan.docgen`` rewrites them; a test fails when they are out of date, so the
reference can never drift from the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from trainplan.ir.plan import Plan
from trainplan.ir.spec import Spec
from trainplan.models import CATALOGUE

HEADER = """# Spec reference

Generated from the schema by `python -m trainplan.docgen`; do not edit by hand.
A spec is YAML; unknown keys are errors. Sizes accept bytes or strings such as `"40 GiB"`,
bandwidths `"25 GB/s"` or `"200 Gb/s"`, rates `"312 TFLOP/s"`, durations `"5 us"`.
Every `parallel` field is `auto` (the planner decides) or a fixed value the planner honours.
The JSON Schemas are in [`schema/spec.schema.json`](schema/spec.schema.json) and
[`schema/plan.schema.json`](schema/plan.schema.json).
"""


def _type_of(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"[{prop['$ref'].split('/')[-1]}](#{prop['$ref'].split('/')[-1].lower()})"
    if "const" in prop:
        return repr(prop["const"])
    if "enum" in prop:
        return " \\| ".join(json.dumps(v) for v in prop["enum"])
    if "anyOf" in prop:
        return " \\| ".join(_type_of(p) for p in prop["anyOf"])
    if prop.get("type") == "array":
        items = prop.get("items") or prop.get("prefixItems")
        inner = _type_of(items) if isinstance(items, dict) else ", ".join(_type_of(i) for i in items or [])
        return f"list of {inner}"
    if prop.get("type") == "object" and "additionalProperties" in prop:
        extra = prop["additionalProperties"]
        return f"map of {_type_of(extra) if isinstance(extra, dict) else 'any'}"
    return str(prop.get("type", "any"))


def _section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"## {name}", ""]
    if schema.get("description"):
        lines += [" ".join(schema["description"].split()), ""]
    lines += ["| key | type | default | description |", "|---|---|---|---|"]
    required = set(schema.get("required", []))
    for key, prop in schema.get("properties", {}).items():
        default = "required" if key in required else f"`{json.dumps(prop.get('default'))}`"
        desc = " ".join(str(prop.get("description", "")).split())
        lines.append(f"| `{key}` | {_type_of(prop)} | {default} | {desc} |")
    return lines + [""]


def spec_reference() -> str:
    schema = Spec.model_json_schema(by_alias=True)
    parts = [HEADER, *_section("Spec", schema)]
    for name, sub in schema.get("$defs", {}).items():
        parts += _section(name, sub)
    parts += ["# Catalogue models", "", "`model: {catalogue: NAME, args: {...}}` takes these `args`.", ""]
    for name, entry in sorted(CATALOGUE.items()):
        sub = entry.config.model_json_schema(by_alias=True)
        sub["description"] = f"Task kind: `{entry.task_kind}`. " + sub.get("description", "")
        parts += _section(f"catalogue: {name}", sub)
    return "\n".join(parts)


def outputs() -> dict[str, str]:
    """Relative path → content of every generated document."""
    return {
        "docs/spec-reference.md": spec_reference(),
        "docs/schema/spec.schema.json": json.dumps(Spec.model_json_schema(by_alias=True), indent=2) + "\n",
        "docs/schema/plan.schema.json": json.dumps(Plan.model_json_schema(by_alias=True), indent=2) + "\n",
    }


def main(root: Path = Path(".")) -> int:
    for rel, text in outputs().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".")))
