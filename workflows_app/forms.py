"""Forms of the dashboard's operator actions. They validate input only; the
view passes the cleaned values to one engine command."""

from __future__ import annotations

import uuid
from typing import Any, cast

from django import forms
from django.core.validators import ProhibitNullCharactersValidator
from django.utils.text import capfirst

from workflows_app.validation import BadInput, check_text, parse_json

MAX_OUTPUT_BYTES = 64 * 1024
BULK_LIMIT = 100


def sentence(message: str) -> str:
    """A validation message as the pages show it: capitalised, with a period."""
    return f"{capfirst(message)}."


def refusal(exc: BadInput) -> forms.ValidationError:
    return forms.ValidationError(sentence(exc.message), code=exc.code)


class TextField(forms.CharField):
    """Free text PostgreSQL can store, checked like the API checks it (no NUL
    characters, no lone surrogates), with a message that names the field."""

    def __init__(self, *, what: str = "text", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.what = what
        # Replaced by the shared check below (one message, not two).
        self.validators = [
            v
            for v in self.validators
            if not isinstance(v, ProhibitNullCharactersValidator)
        ]

    def validate(self, value: Any) -> None:
        super().validate(value)
        try:
            check_text(value or "", f"the {self.what}")
        except BadInput as exc:
            raise refusal(exc) from None


def clean_reason(value: str, what: str = "reason") -> str:
    """An optional reason posted outside a form: stripped, cut to 2,000
    characters and checked; raises ``forms.ValidationError``."""
    cleaned: str = TextField(what=what, required=False, max_length=None).clean(
        value.strip()[:2000]
    )
    return cleaned


class ActionForm(forms.Form):
    reason = TextField(
        what="reason",
        max_length=2000,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Required. Recorded in the timeline with your name.",
    )
    # The instance version the operator saw: the command refuses to act if
    # anyone changed the instance since, instead of acting twice.
    version = forms.IntegerField(min_value=0, widget=forms.HiddenInput)
    step = forms.IntegerField(required=False, widget=forms.HiddenInput)

    def action_data(self) -> dict[str, Any] | None:
        """The action's ``data`` from the cleaned form (None: none)."""
        if "output" in self.cleaned_data:
            return {"output": self.cleaned_data["output"]}
        return None


class ExtendTimerForm(ActionForm):
    by_minutes = forms.IntegerField(
        min_value=1,
        max_value=10 * 366 * 24 * 60,
        label="Wait this many minutes longer",
        help_text="Added to the time the timer wakes at now.",
    )

    def action_data(self) -> dict[str, Any] | None:
        return {"by_seconds": self.cleaned_data["by_minutes"] * 60}


class MarkStepDoneForm(ActionForm):
    output = TextField(
        what="output",
        required=False,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
        label="Output (optional JSON object)",
        help_text='What the step produced, e.g. {"reference": "SHIP-123"}.',
    )

    def clean_output(self) -> dict[str, Any] | None:
        text = self.cleaned_data["output"]
        if not text:
            return None
        return parse_json_object(text, "output")


class RestartForm(ActionForm):
    """The step to restart from is required (the page offers the definition's
    restart points as a select named ``step``)."""

    step = forms.IntegerField(required=True, widget=forms.HiddenInput)


class BulkActionForm(forms.Form):
    ACTIONS = [
        ("retry", "Retry (the failed step, or the failed compensation)"),
        ("compensate", "Compensate (undo the steps done)"),
    ]

    action = forms.ChoiceField(choices=ACTIONS)
    reason = TextField(
        what="reason",
        max_length=2000,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 1}),
    )
    # "<instance id>:<version seen>" per selected row.
    selected = forms.MultipleChoiceField(required=True)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        values = self.data.getlist("selected") if hasattr(self.data, "getlist") else []
        selected = cast(forms.MultipleChoiceField, self.fields["selected"])
        selected.choices = [(v, v) for v in values]

    def clean_selected(self) -> list[tuple[uuid.UUID, int]]:
        pairs = []
        for value in self.cleaned_data["selected"]:
            pk, _, version = value.partition(":")
            try:
                pairs.append((uuid.UUID(pk), int(version)))
            except ValueError as exc:
                raise forms.ValidationError(f"Not an instance: {value!r}.") from exc
        if len(pairs) > BULK_LIMIT:
            raise forms.ValidationError(
                f"Select at most {BULK_LIMIT} instances at a time."
            )
        return list(dict(pairs).items())


class BulkJobForm(forms.Form):
    """Plan a server-side job over every instance the list's filters match."""

    ACTIONS = BulkActionForm.ACTIONS

    action = forms.ChoiceField(choices=ACTIONS)
    reason = TextField(
        what="reason",
        max_length=2000,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text="Required. Recorded in every affected timeline with your name.",
    )
    rate = forms.FloatField(
        min_value=0,
        max_value=1000,
        initial=10,
        label="Rate (instances per second, 0 for no limit)",
        help_text="Keep it low while the participant recovers from an outage.",
    )


class KnownFailureForm(forms.Form):
    definition_key = TextField(
        what="definition", max_length=100, widget=forms.HiddenInput
    )
    # Empty for a deadline group (no step holds those instances).
    step_name = TextField(
        what="step", max_length=100, required=False, widget=forms.HiddenInput
    )
    signature = TextField(
        what="signature",
        max_length=300,
        required=False,
        strip=False,
        widget=forms.HiddenInput,
    )
    note = TextField(
        what="note",
        max_length=2000,
        strip=True,
        required=False,  # not when forgetting the mark
        widget=forms.Textarea(attrs={"rows": 2}),
        help_text='What is known, e.g. "payments outage INC-42, retry after 14:00".',
    )


def parse_json_object(text: str, what: str) -> dict[str, Any]:
    """A JSON object from a form field, with a message a person can act on:
    the API's checks, so that nothing the database cannot store gets to a
    command (NaN, 1e999, lone surrogates, NUL, deep nesting)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_OUTPUT_BYTES:
        raise forms.ValidationError(f"The {what} is larger than 64 KB.")
    try:
        value = parse_json(text, f"the {what}")
    except BadInput as exc:
        raise refusal(exc) from None
    if not isinstance(value, dict):
        raise forms.ValidationError(f"The {what} must be a JSON object: {{...}}.")
    return value


class RepairForm(ActionForm):
    """Correct the instance's input, or a finished step's recorded output."""

    target = forms.CharField(
        max_length=20,
        initial="input",
        widget=forms.HiddenInput,
        help_text='"input", or the id of a finished step',
    )
    value = TextField(
        what="value",
        strip=True,
        widget=forms.Textarea(attrs={"rows": 10, "spellcheck": "false"}),
        label="New value (JSON object)",
    )

    def clean_value(self) -> dict[str, Any]:
        return parse_json_object(self.cleaned_data["value"], "value")

    def clean_target(self) -> str | int:
        target: str = self.cleaned_data["target"]
        if target == "input":
            return target
        try:
            return int(target)
        except ValueError:
            raise forms.ValidationError("Choose the input or a step.") from None


class DecisionForm(forms.Form):
    note = TextField(
        what="note",
        max_length=2000,
        required=False,
        strip=True,
        widget=forms.Textarea(attrs={"rows": 1}),
    )
