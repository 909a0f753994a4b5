"""`StructuredOutputsParams`: the constraint a request's output must follow (vLLM's class and field names).

Exactly one of ``json`` (a JSON schema, as a dict or its JSON text), ``regex``, ``choice`` (the output is one
of these strings), ``grammar`` (EBNF in xgrammar's GBNF dialect) or ``json_object`` (any JSON object) is given.
``disable_any_whitespace``: JSON without optional whitespace; ``disable_additional_properties``: objects of
the schema that do not say otherwise admit no properties beyond those listed. The grammar is compiled by
xgrammar (`pagoda.engine.structured`) when the request is added; what xgrammar rejects is a ValueError there.
"""
from __future__ import annotations

import json as json_module
from dataclasses import dataclass

_CONSTRAINTS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(_CONSTRAINTS)}; got "
                             f"{', '.join(given) if given else 'none'}")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise TypeError(f"json must be a JSON schema (dict or str), got {type(self.json).__name__}")
        if isinstance(self.json, str):
            try:
                json_module.loads(self.json)
            except json_module.JSONDecodeError as e:
                raise ValueError(f"json is not valid JSON: {e}") from None
        if self.regex is not None and not isinstance(self.regex, str):
            raise TypeError(f"regex must be a str, got {type(self.regex).__name__}")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise TypeError(f"grammar must be a str, got {type(self.grammar).__name__}")
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not all(isinstance(c, str) for c in self.choice):
                raise TypeError("choice must be a list of str")
            if not self.choice:
                raise ValueError("choice must not be empty")
            self.choice = list(self.choice)
        for name in ("disable_any_whitespace", "disable_additional_properties"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if self.whitespace_pattern is not None:
            raise ValueError("whitespace_pattern is not supported by the xgrammar backend (use disable_any_whitespace)")

    def cache_key(self) -> tuple:
        """What identifies the compiled grammar (schemas are keyed by their canonical JSON text)."""
        json_key = json_module.dumps(self.json, sort_keys=True) if isinstance(self.json, dict) else self.json
        return (json_key, self.regex, tuple(self.choice) if self.choice is not None else None, self.grammar,
                self.json_object, self.structural_tag, self.disable_any_whitespace,
                self.disable_additional_properties)
