"""The JSON Schema corpus of the structured-output tests (and benchmarks/structured.py): nested objects,
arrays with bounds, enums, const, bounded numbers and integers, strings with patterns and formats, required and
optional fields, anyOf/oneOf, $ref definitions, additionalProperties false. Strings and numbers are bounded
where a random model would otherwise never stop (it emits garbage: only the constraint makes it parse).
Formats are llguidance's RFC 3339 syntax: "date" and "time" are left out of the sampled runs' checks where
the calendar matters (llguidance accepts February 29 of any year and second 60 of any minute, which
jsonschema's format checker rejects); "date" stays, on outputs that happen not to hit either."""

NAME = {"type": "string", "minLength": 1, "maxLength": 8}
SMALL = {"type": "integer", "minimum": 0, "maximum": 99}

SCHEMAS = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"age": SMALL}, "required": ["age"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"x": {"type": "null"}}, "required": ["x"], "additionalProperties": False},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {"type": "object", "properties": {"version": {"const": 2}, "kind": {"const": "point"}},
     "required": ["version", "kind"], "additionalProperties": False},
    {"type": "object", "properties": {"t": {"type": "number", "minimum": -1.5, "maximum": 2.5}}, "required": ["t"],
     "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20}},
     "required": ["n"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"day": {"type": "string", "format": "date"}}, "required": ["day"],
     "additionalProperties": False},
    {"type": "object", "properties": {"mail": {"type": "string", "format": "email", "maxLength": 20}},
     "required": ["mail"], "additionalProperties": False},
    {"type": "object", "properties": {"id": {"type": "string", "format": "uuid"}}, "required": ["id"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "array", "items": SMALL, "minItems": 2, "maxItems": 4},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 5},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": SMALL, "y": SMALL},
                                                "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object", "properties": {
        "c": {"type": "boolean"}}, "required": ["c"], "additionalProperties": False}}, "required": ["b"],
        "additionalProperties": False}}, "required": ["a"], "additionalProperties": False},
    {"type": "object", "properties": {"name": NAME, "nick": NAME}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"v": {"anyOf": [SMALL, {"type": "boolean"}]}}, "required": ["v"],
     "additionalProperties": False},
    {"type": "object", "properties": {"v": {"oneOf": [{"type": "string", "maxLength": 4}, {"type": "null"}]}},
     "required": ["v"], "additionalProperties": False},
    {"type": "object", "$defs": {"person": {"type": "object", "properties": {"name": NAME, "age": SMALL},
                                            "required": ["name", "age"], "additionalProperties": False}},
     "properties": {"author": {"$ref": "#/$defs/person"}, "editor": {"$ref": "#/$defs/person"}},
     "required": ["author"], "additionalProperties": False},
    {"definitions": {"item": {"type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{2}[0-9]$"},
                                                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                              "required": ["sku", "qty"], "additionalProperties": False}},
     "type": "object", "properties": {"items": {"type": "array", "items": {"$ref": "#/definitions/item"},
                                                "minItems": 1, "maxItems": 2}},
     "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "items": {"type": "array", "items": SMALL,
                                                                             "minItems": 2, "maxItems": 2},
                                                 "minItems": 2, "maxItems": 2}},
     "required": ["matrix"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["ok", "error"]}, "detail": NAME,
                                      "retry": {"type": "boolean"}},
     "required": ["status", "retry"], "additionalProperties": False},
    {"type": "string", "enum": ["north", "south", "east", "west"]},
    {"type": "integer", "minimum": -50, "maximum": 50},
    {"type": "boolean"},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}, "label": NAME},
     "required": ["score", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"shape": {"oneOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": SMALL}, "required": ["kind", "r"],
         "additionalProperties": False},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": SMALL}, "required": ["kind", "side"],
         "additionalProperties": False}]}}, "required": ["shape"], "additionalProperties": False},
    {"type": "object", "properties": {"host": {"type": "string", "format": "ipv4"}}, "required": ["host"],
     "additionalProperties": False},
    {"type": "object", "properties": {"name": NAME, "address": {"type": "object", "properties": {
        "street": NAME, "city": NAME, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"], "additionalProperties": False},
        "phones": {"type": "array", "items": {"type": "string", "pattern": "^\\+?[0-9]{3,6}$"}, "maxItems": 2}},
     "required": ["name", "address"], "additionalProperties": False},
    {"type": "object", "properties": {"flags": {"type": "array", "items": {"type": "boolean"}, "minItems": 3,
                                                "maxItems": 3}}, "required": ["flags"], "additionalProperties": False},
    {"type": "object", "properties": {"choice": {"anyOf": [{"const": "all"}, {"type": "array", "items": SMALL,
                                                                              "maxItems": 2}]}},
     "required": ["choice"], "additionalProperties": False},
]

# A 10-field nested schema (the benchmark's): an order with a customer, lines and totals.
NESTED = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{4}$"},
        "customer": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                      "email": {"type": "string", "format": "email", "maxLength": 32},
                                                      "vip": {"type": "boolean"}},
                     "required": ["name", "email", "vip"], "additionalProperties": False},
        "lines": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
            "required": ["sku", "qty"], "additionalProperties": False}},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "total": {"type": "number", "minimum": 0, "maximum": 100000},
        "paid": {"type": "boolean"},
        "note": {"type": "string", "maxLength": 40},
    },
    "required": ["order_id", "customer", "lines", "currency", "total", "paid", "note"],
    "additionalProperties": False,
}
