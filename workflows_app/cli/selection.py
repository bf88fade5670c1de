"""A filter of instances from command-line options: the instance list's own
filter (``filters.InstanceFilter``), fed the query string the list page
would send, plus a business-key prefix the list does not have."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from django.db.models import QuerySet
from django.http import QueryDict

from workflows_app.cli.exits import bad_input
from workflows_app.filters import SORTS, STATE_CHOICES, InstanceFilter
from workflows_app.models import WorkflowInstance

# Option (attribute name) -> the list's query parameter.
PARAMS = {
    "definition": "definition",
    "state": "state",
    "stuck": "stuck",
    "failed_step": "failed_step",
    "signature": "signature",
    "idle": "idle",
    "accepted_after": "accepted_after",
    "accepted_before": "accepted_before",
    "sort": "sort",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (as on the instance list)")
    group.add_argument("--definition", metavar="KEY", help="Workflow definition key.")
    group.add_argument(
        "--state",
        "--status",
        metavar="STATE",
        help=f"One of: {', '.join(value for value, _ in STATE_CHOICES)}.",
    )
    stuck = group.add_mutually_exclusive_group()
    stuck.add_argument(
        "--stuck", action="store_const", const="yes", help="Stuck instances only."
    )
    stuck.add_argument(
        "--not-stuck",
        dest="stuck",
        action="store_const",
        const="no",
        help="Instances not stuck.",
    )
    group.add_argument(
        "--business-key", metavar="PREFIX", help="Business keys starting with this."
    )
    group.add_argument(
        "--failed-step", metavar="NAME", help="Held by this failed or unknown step."
    )
    group.add_argument(
        "--signature", metavar="TEXT", help="With this error signature (a group)."
    )
    group.add_argument(
        "--idle", choices=["5m", "1h", "1d", "7d"], help="No progress for this long."
    )
    group.add_argument("--accepted-after", metavar="UTC", help="e.g. 2026-12-01T08:00")
    group.add_argument("--accepted-before", metavar="UTC")
    group.add_argument("--sort", choices=sorted(SORTS), help="Default: -progress.")


@dataclasses.dataclass(frozen=True)
class Selection:
    filterset: InstanceFilter
    query: str  # the list's query string (without the business-key prefix)
    business_key: str
    description: str

    @property
    def is_filtered(self) -> bool:
        return bool(self.business_key) or self.filterset.is_filtered

    def queryset(self) -> QuerySet[Any]:
        return self.filterset.qs

    def ordered(self) -> QuerySet[Any]:
        """In the list's order (its keyset sort, then the id)."""
        field, descending = SORTS[self.filterset.sort_key]
        sign = "-" if descending else ""
        return self.filterset.qs.order_by(f"{sign}{field}", f"{sign}pk")


def select(options: dict[str, Any]) -> Selection:
    """The instances the options select; exit 2 on a value the list refuses."""
    params = QueryDict(mutable=True)
    for option, param in PARAMS.items():
        value = options.get(option)
        if value not in (None, ""):
            params[param] = str(value)
    prefix = (options.get("business_key") or "").strip()
    # The JSON documents stay out of lists and plans.
    base = WorkflowInstance.objects.select_related("definition").defer(
        "input", "outputs"
    )
    if prefix:
        base = base.filter(business_key__startswith=prefix)
    filterset = InstanceFilter(params, queryset=base)
    if not filterset.is_valid():
        problems = "; ".join(
            f"--{name.replace('_', '-')}: {' '.join(map(str, errors))}"
            for name, errors in filterset.form.errors.items()
        )
        raise bad_input(problems)
    return Selection(
        filterset, params.urlencode(), prefix, _describe(filterset, prefix)
    )


def _describe(filterset: InstanceFilter, prefix: str) -> str:
    """The selection in words, as the bulk job pages word it."""
    parts = []
    for name, value in filterset.form.cleaned_data.items():
        if value in (None, "") or name == "sort":
            continue
        field = filterset.form.fields[name]
        shown = dict(getattr(field, "choices", ())).get(value, value)
        parts.append(f"{field.label or name}: {shown}")
    if prefix:
        parts.append(f"Business key starts with: {prefix}")
    return "; ".join(parts) or "every instance"
