"""Client-supplied regular expressions, and the JSON Schemas that carry them, run in bounded time.

A schema in `response_format` or a tool's `input_schema` is untrusted code. Python's `re`
backtracks (`^(a+)+$` against 25 characters held a worker 12 s, holding the GIL), and
`jsonschema` runs `pattern` and `patternProperties` with it. So every pattern a client sends
runs here on RE2 (`google-re2`), whose time is linear in the text and which releases the GIL
while it matches. RE2 has no backreferences and no lookaround: a schema that uses them is
refused when the request is validated (`schema_problem`), never run on another engine.

The rest of a schema check is bounded by a step budget (`Budget`): a step is one keyword
applied to one value, a few microseconds. A few `$ref`s make a 1.5 KB schema exponentially
expensive (each of 22 levels refers twice to the next: 107 s), and `uniqueItems` is quadratic
in `jsonschema`; here it is linear, and a check that runs out of steps stops with `Unchecked`.
`$ref`s resolve within the schema itself: remote ones are never fetched (jsonschema's default
registry would fetch them, with no timeout, from wherever they point).
"""

from __future__ import annotations

import contextvars
import re
import reprlib
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import attrs
import re2
from jsonschema import Draft202012Validator, FormatChecker, ValidationError
from jsonschema.validators import extend
from jsonschema_specifications import REGISTRY as SPECIFICATIONS
from referencing.exceptions import Unresolvable

# Longer patterns are refused; it keeps the compiled-pattern cache small. Real ones (a URL, an
# e-mail address) are a few hundred characters.
MAX_PATTERN_LENGTH = 10_000
# A step takes 2 to 20 microseconds. Checking a request's schema against the metaschema costs
# about 35 steps per subschema: a schema of 4,000 subschemas passes, in well under a second.
SCHEMA_STEPS = 150_000
# Checking a model's answer costs about 6 steps per value of a plain schema: answers of tens of
# thousands of values pass, and any check stops within a few seconds.
OUTPUT_STEPS = 300_000
# Error messages quote the value checked, which can be megabytes.
MESSAGE_CHARS = 300

_OPTIONS = re2.Options()
_OPTIONS.log_errors = False  # a refused pattern is the client's problem, reported to them
# Python's `re` below only ever runs our own patterns, none with nested quantifiers.
_UNICODE_ESCAPE = re.compile(r"\\(\\|u([0-9A-Fa-f]{4}))")


class UnsupportedPattern(ValueError):
    """A pattern RE2 cannot run; the message says why, as the end of a sentence."""


class Unchecked(Exception):
    """A schema check that could not be completed; the message says why."""


class Budget:
    """Steps a schema check may take, shared by every check made with it."""

    def __init__(self, steps: int):
        self.left = steps
        self.steps = steps

    @property
    def exhausted(self) -> bool:
        return self.left < 0

    def spend(self, steps: int = 1) -> None:
        self.left -= steps
        if self.left < 0:
            raise Unchecked(f"checking it takes more than {self.steps:,} steps")


# --- patterns --------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re2._Regexp:
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise UnsupportedPattern(f"is longer than {MAX_PATTERN_LENGTH:,} characters")
    try:
        return re2.compile(_UNICODE_ESCAPE.sub(_unicode_escape, pattern), _OPTIONS)
    except re2.error as exc:
        raise UnsupportedPattern(_why(exc)) from None


def search(pattern: str, text: str) -> bool:
    """Whether `pattern` matches anywhere in `text`, as JSON Schema's `pattern` asks."""
    return compile_pattern(pattern).search(text) is not None


def _unicode_escape(match: re.Match[str]) -> str:
    # ECMA-262's \uXXXX, common in JSON Schemas, is RE2's \x{XXXX}; an escaped backslash stays.
    return match.group(0) if match.group(2) is None else "\\x{" + match.group(2) + "}"


_ENGINE = "patterns run on a linear-time engine (RE2), without backreferences or lookaround"


def _why(exc: re2.error) -> str:
    detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
    if re.match(r"invalid perl operator: \(\?<?[=!]", detail):
        return f"uses lookaround, which this service does not support; {_ENGINE}"
    if re.match(r"invalid escape sequence: \\[1-9]", detail):
        return f"uses a backreference, which this service does not support; {_ENGINE}"
    return f"is not one this service can run (RE2 says: {detail}); {_ENGINE}"


def _describe(pattern: Any) -> str:
    text = str(pattern)
    return f'"{text if len(text) <= 80 else text[:80] + "…"}"'


# --- schemas ---------------------------------------------------------------------------------

_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("schema_budget", default=None)


def _spend(steps: int = 1) -> None:
    budget = _BUDGET.get()
    if budget is not None:
        budget.spend(steps)


def _matches(pattern: Any, text: str) -> bool:
    if not isinstance(pattern, str):
        raise Unchecked(f"pattern {_describe(pattern)} is not a string")
    try:
        return search(pattern, text)
    except UnsupportedPattern as exc:
        # Only reachable through a $ref into a place the metaschema does not check.
        raise Unchecked(f"pattern {_describe(pattern)} {exc}") from None


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _matches(pattern, instance):
        yield ValidationError(f"{_quote(instance)} does not match {_describe(pattern)}")


def _pattern_properties(validator: Any, pattern_properties: dict, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in pattern_properties.items():
        _spend(len(instance))
        for key, value in instance.items():
            if _matches(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(validator: Any, additional: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = [key for key in instance if not _declared(key, schema)]
    if validator.is_type(additional, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], additional, path=extra)
    elif not additional and extras:
        yield ValidationError(f"Additional properties are not allowed ({_quote(sorted(extras))} unexpected)")


def _declared(key: str, schema: dict) -> bool:
    """Whether `properties` or `patternProperties` speaks for `key`."""
    if key in (schema.get("properties") or {}):
        return True
    patterns = schema.get("patternProperties") or {}
    _spend(len(patterns))
    return any(_matches(pattern, key) for pattern in patterns)


def _unevaluated_properties(validator: Any, unevaluated: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    evaluated = _evaluated_keys(validator, instance, schema)
    invalid = [
        key for key in instance
        if key not in evaluated and next(validator.descend(instance[key], unevaluated, path=key, schema_path=key), None)
    ]
    if invalid:
        yield ValidationError(f"Unevaluated properties are not allowed ({_quote(sorted(invalid))} unexpected)")


def _evaluated_keys(validator: Any, instance: dict, schema: Any) -> set[str]:
    """The keys of `instance` that `schema` evaluates, for unevaluatedProperties: jsonschema's
    `find_evaluated_property_keys_by_schema`, with patternProperties matched on RE2."""
    _spend()
    if not isinstance(schema, dict):
        return set()
    keys: set[str] = set()
    for keyword in ("$ref", "$dynamicRef"):
        reference = schema.get(keyword)
        if isinstance(reference, str):
            resolved = validator._resolver.lookup(reference)
            inner = validator.evolve(schema=resolved.contents, _resolver=resolved.resolver)
            keys |= _evaluated_keys(inner, instance, resolved.contents)
    properties = schema.get("properties")
    if isinstance(properties, dict):
        keys |= properties.keys() & instance.keys()
    for keyword in ("additionalProperties", "unevaluatedProperties"):
        if keyword in schema:
            keys |= {key for key, value in instance.items() if _is_valid(validator.descend(value, schema[keyword]))}
    for pattern in schema.get("patternProperties") or {}:
        _spend(len(instance))
        keys |= {key for key in instance if _matches(pattern, key)}
    for name, subschema in (schema.get("dependentSchemas") or {}).items():
        if name in instance:
            keys |= _evaluated_keys(validator, instance, subschema)
    for keyword in ("allOf", "oneOf", "anyOf"):
        for subschema in schema.get(keyword) or ():
            if _is_valid(validator.descend(instance, subschema)):
                keys |= _evaluated_keys(validator, instance, subschema)
    if "if" in schema:
        if validator.evolve(schema=schema["if"]).is_valid(instance):
            keys |= _evaluated_keys(validator, instance, schema["if"])
            if "then" in schema:
                keys |= _evaluated_keys(validator, instance, schema["then"])
        elif "else" in schema:
            keys |= _evaluated_keys(validator, instance, schema["else"])
    return keys


def _is_valid(errors: Iterator[ValidationError]) -> bool:
    return next(errors, None) is None


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    # jsonschema compares every pair when items do not sort (objects): quadratic.
    if not unique or not validator.is_type(instance, "array"):
        return
    _spend(len(instance))
    seen: set[Any] = set()
    for item in instance:
        key = canonical(item)
        if key in seen:
            yield ValidationError(f"{_quote(instance)} has non-unique elements")
            return
        seen.add(key)


def canonical(value: Any) -> Any:
    """A hashable key equal for equal JSON values: 1 == 1.0, but true != 1, key order ignored."""
    if isinstance(value, bool) or value is None:
        return ("literal", value)
    if isinstance(value, (int, float)):
        return ("number", value)
    if isinstance(value, str):
        return ("string", value)
    if isinstance(value, list):
        return ("array", tuple(canonical(item) for item in value))
    if isinstance(value, dict):
        return ("object", frozenset((key, canonical(item)) for key, item in value.items()))
    return ("other", repr(value))


def _counted(keyword: Any, name: str) -> Any:
    """`keyword`, charging the budget one step per application (plus the size of an `enum`, which
    is compared item by item) and for each error it reports (which quotes the value)."""

    def counted(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
        _spend(1 + (len(value) if name == "enum" and isinstance(value, list) else 0))
        for error in keyword(validator, value, instance, schema) or ():
            _spend(1 + len(error.message) // 64)
            yield error

    return counted


_KEYWORDS = {
    **Draft202012Validator.VALIDATORS,
    "pattern": _pattern,
    "patternProperties": _pattern_properties,
    "additionalProperties": _additional_properties,
    "unevaluatedProperties": _unevaluated_properties,
    "uniqueItems": _unique_items,
}
_Validator = extend(Draft202012Validator, {name: _counted(keyword, name) for name, keyword in _KEYWORDS.items()})
_EVOLVE_FIELDS = [(field.name, field.alias) for field in attrs.fields(_Validator) if field.init]


def _evolve(self: Any, **changes: Any) -> Any:
    # jsonschema's own evolve switches to its stock validator for a subschema that names a
    # `$schema`, which would run that part with Python's `re` and no budget.
    changes.setdefault("schema", self.schema)
    for name, alias in _EVOLVE_FIELDS:
        changes.setdefault(alias, getattr(self, name))
    return _Validator(**changes)


_Validator.evolve = _evolve

# What check_schema uses, with the `regex` format (on `pattern`, and on patternProperties' keys)
# checked by RE2: jsonschema's own checker compiles it with Python's `re`.
_METASCHEMA_FORMATS = FormatChecker(formats=())
_METASCHEMA_FORMATS.checks("regex", raises=UnsupportedPattern)(lambda value: not isinstance(value, str) or bool(compile_pattern(value)))


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not one this service can apply (a sentence), or None."""
    checker = _Validator(_Validator.META_SCHEMA, format_checker=_METASCHEMA_FORMATS, registry=SPECIFICATIONS)
    try:
        error = _first_error(checker, schema, Budget(SCHEMA_STEPS))
    except Unchecked as exc:
        return f"is too large or complex for this service: {exc}"
    if error is None:
        return None
    parts = list(error.path)
    if error.validator == "format" and error.validator_value == "regex" and isinstance(error.cause, UnsupportedPattern):
        kind = "patternProperties key" if parts and parts[-1] == "patternProperties" else "pattern"
        where = _json_path(parts[:-1]).lstrip(".")
        return f"{kind} {_describe(error.instance)}{f' at {where}' if where else ''} {error.cause}"
    path = _json_path(parts)
    return f"is not a valid JSON Schema: {error.message}" + (f" (at {path})" if path else "")


def _json_path(parts: list[Any]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts)


def first_error(schema: Any, instance: Any, *, budget: Budget | None = None) -> ValidationError | None:
    """The first way `instance` breaks `schema`, or None. Raises Unchecked when the check cannot
    be completed: out of steps, a `$ref` that leads nowhere, a pattern RE2 cannot run."""
    return _first_error(_Validator(schema, registry=SPECIFICATIONS), instance, budget or Budget(OUTPUT_STEPS))


class SchemaChecker:
    """One client schema, checked repeatedly (echo tries many candidates) within one budget;
    `$ref`s in a subschema resolve against the whole schema."""

    def __init__(self, root: Any, budget: Budget):
        self.validator = _Validator(root if isinstance(root, (dict, bool)) else {}, registry=SPECIFICATIONS)
        self.budget = budget

    def is_valid(self, instance: Any, schema: Any) -> bool:
        """Whether `instance` satisfies `schema`, a part of the root; False when that cannot be told."""
        try:
            return _first_error(self.validator.evolve(schema=schema), instance, self.budget) is None
        except Unchecked:
            return False


def _first_error(validator: Any, instance: Any, budget: Budget) -> ValidationError | None:
    token = _BUDGET.set(budget)
    try:
        error = next(iter(validator.iter_errors(instance)), None)
    except Unresolvable as exc:
        ref = str(getattr(exc, "ref", ""))
        raise Unchecked(f"$ref {_describe('#' + ref if ref.startswith('/') else ref)} does not lead to a part of the schema (remote references are not fetched)") from None
    except RecursionError:
        raise Unchecked("it nests too deeply (a $ref to itself without end, or a deeply nested value)") from None
    except Unchecked:
        raise
    except Exception as exc:
        # The metaschema checked every place a schema is expected; a $ref can lead elsewhere.
        raise Unchecked(f"a $ref leads to something that is not a valid schema ({type(exc).__name__})") from None
    finally:
        _BUDGET.reset(token)
    if error is not None:
        error.message = _short(error.message)
    return error


def _short(message: str) -> str:
    if len(message) > MESSAGE_CHARS:
        return message[:MESSAGE_CHARS] + f"… ({len(message):,} characters)"
    return message


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlevel = 3


def _quote(value: Any) -> str:
    """`repr(value)` cut short: the full one of a megabyte value costs a megabyte."""
    return _REPR.repr(value)
