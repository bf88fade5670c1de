"""The instance list's search box, shared by the pages, the API and the CLI.

Syntax (terms separated by spaces, all must match):

- ``ORD-5402`` / ``ord-54020-76``: business keys starting with it, any case;
  also instance ids starting with it when it is hexadecimal (the list's short
  id ``7a79e74c``, or a whole UUID);
- ``customer:c-349``: a declared search attribute equal to the value, any
  case (``customer:"Jane Doe"`` for a value with spaces);
- ``"order 7: rush"``: a quoted business-key prefix (spaces, colons).

Every term is served by an index on PostgreSQL: ``instance_business_key_upper``
(``upper(business_key) text_pattern_ops``), the primary key (an id prefix is a
range of UUIDs) and ``instance_search_attributes`` (GIN, ``@>``).
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

from django.db import connection
from django.db.models import Q, QuerySet, TextField
from django.db.models.fields.json import KT
from django.db.models.functions import Cast, Upper

from workflows_app.models import WorkflowDefinition, WorkflowInstance
from workflows_app.search_attributes import text_of

TERM = re.compile(
    r'(?P<name>[A-Za-z][A-Za-z0-9_]*):(?:"(?P<quoted>[^"]*)"|(?P<value>\S+))'
    r'|"(?P<phrase>[^"]*)"'
    r"|(?P<word>\S+)"
)
HEX = re.compile(r"[0-9a-f]{1,32}")
MAX_TERMS = 10
# See apply(): up to this many matches the list pages over their ids.
PROBE_LIMIT = 1000


class SearchError(ValueError):
    """A search the list cannot run; the message says why, for a form error."""


@dataclasses.dataclass(frozen=True)
class Search:
    prefixes: tuple[str, ...] = ()
    attributes: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.prefixes or self.attributes)


def declared_names() -> set[str]:
    """Every attribute name some definition version declares (a small table)."""
    names: set[str] = set()
    for declared in WorkflowDefinition.objects.values_list(
        "search_attributes", flat=True
    ):
        if isinstance(declared, dict):
            names.update(declared)
    return names


def parse(text: str) -> Search:
    """The terms of ``text``; raises ``SearchError`` for an attribute no
    definition declares (a typo would otherwise silently find nothing)."""
    prefixes: list[str] = []
    attributes: dict[str, str] = {}
    names: set[str] | None = None
    for match in TERM.finditer(text.strip()):
        if len(prefixes) + len(attributes) >= MAX_TERMS:
            raise SearchError(f"Use at most {MAX_TERMS} search terms.")
        if match["name"]:
            name = match["name"].lower()
            raw = match["quoted"] if match["quoted"] is not None else match["value"]
            if names is None:
                names = declared_names()
            if name not in names:
                known = ", ".join(sorted(names)) or "none yet"
                raise SearchError(
                    f"No workflow declares the search attribute {name!r} "
                    f"(declared: {known}). To find a business key with a "
                    'colon, put it in double quotes: "order:7".'
                )
            value = text_of(raw)
            if value is None:
                raise SearchError(f"Give a value after {name}: (at most 200 chars).")
            if attributes.get(name, value) != value:
                raise SearchError(f"{name}: is given twice with different values.")
            attributes[name] = value
        else:
            term = match["phrase"] if match["phrase"] is not None else match["word"]
            if term.strip():
                prefixes.append(term.strip())
    return Search(tuple(prefixes), tuple(sorted(attributes.items())))


def id_range(term: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The ids starting with ``term`` as an inclusive range of UUIDs (an
    index range on the primary key), or None when it cannot start an id."""
    digits = term.lower()
    if re.fullmatch(r"[0-9a-f-]{1,36}", digits) and "--" not in digits:
        digits = digits.replace("-", "")
    if not HEX.fullmatch(digits):
        return None
    return uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))


def apply(qs: QuerySet[Any], search: Search) -> QuerySet[Any]:
    """``qs`` narrowed to the instances ``search`` finds.

    On PostgreSQL the matches are first read alone, from the search's index,
    up to ``PROBE_LIMIT`` ids; the list then pages over those ids. Asked in
    one query ("matching, newest progress first, 26 rows"), PostgreSQL may
    walk the progress index and test every row when it overestimates the
    matches: a GIN ``@>`` estimate is often 100 times too high (one
    customer's 100 instances estimated at 10,000), which at 1,000,000
    instances turned a 1 ms search into 3.6 s. More matches than the limit
    are dense enough for that walk to find a page quickly: then the one query.
    """
    if not search:
        return qs
    if connection.vendor == "postgresql":
        alone = conditions(qs.model._default_manager.all(), search).order_by()
        ids = list(alone.values_list("pk", flat=True)[: PROBE_LIMIT + 1])
        if len(ids) <= PROBE_LIMIT:
            return qs.filter(pk__in=ids)
    return conditions(qs, search)


def conditions(qs: QuerySet[Any], search: Search) -> QuerySet[Any]:
    """``qs`` filtered by the search's terms, each on its index."""
    for term in search.prefixes:
        # Compared as upper(business_key) LIKE 'TERM%': the expression of the
        # index, so PostgreSQL walks the index range of the prefix.
        match = Q(business_key_upper__startswith=term.upper())
        ids = id_range(term)
        if ids is not None:
            match |= Q(pk__gte=ids[0], pk__lte=ids[1])
        qs = qs.alias(business_key_upper=Upper("business_key")).filter(match)
    if search.attributes:
        wanted = dict(search.attributes)
        if connection.vendor == "postgresql":
            # One containment test for all of them: the GIN index's operator.
            qs = qs.filter(search_attributes__contains=wanted)
        else:  # SQLite has no JSON containment; small data, no index needed
            for name, value in wanted.items():
                # As text: a key transform's own lookups expect JSON values.
                text = Cast(KT(f"search_attributes__{name}"), TextField())
                alias = f"attr_{name}"
                qs = qs.alias(**{alias: text}).filter(**{alias: value})
    return qs


def examples() -> list[str]:
    """Search terms that find something now, for the search box's hint:
    the newest instance's business-key prefix, its short id and one of its
    search attributes (none on an empty database). A fixed example would
    find nothing in most databases (``customer:c-349`` in the demo)."""
    newest = (
        WorkflowInstance.objects.order_by("-accepted_at")
        .values("id", "business_key", "search_attributes")
        .first()
    )
    if newest is None:
        return []
    key = newest["business_key"]
    terms = [key[:8].lower() if len(key) > 8 else key]
    if re.search(r'[\s":]', terms[0]):
        terms[0] = f'"{terms[0]}"' if '"' not in terms[0] else ""
    terms.append(str(newest["id"])[:8])
    attributes = newest["search_attributes"]
    pairs = attributes.items() if isinstance(attributes, dict) else []
    # A word (a customer) says more than a number (an amount).
    for name, value in sorted(pairs, key=lambda p: (_numeric(p[1]), p[0])):
        if isinstance(value, str) and value and '"' not in value:
            terms.append(f'{name}:"{value}"' if " " in value else f"{name}:{value}")
            break
    return [term for term in terms if term]


def _numeric(value: Any) -> bool:
    return not isinstance(value, str) or bool(re.fullmatch(r"-?[0-9.e+]+", value))
