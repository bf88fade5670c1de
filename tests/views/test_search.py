"""The instance list's search box and state filter, through the Django client:
business-key and id prefixes in any case, declared search attributes, the
``state`` / ``status`` synonyms, and refusals shown as form errors. On
PostgreSQL the plans of the searches use their indexes."""

from __future__ import annotations

import uuid
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import call_command
from django.db import connection
from django.utils import timezone

from tests.support import make_definition, start
from tests.views.conftest import logged_in
from workflows_app import search
from workflows_app.engine.commands import repair
from workflows_app.models import WorkflowInstance
from workflows_app.search_attributes import declaration_errors, extract
from workflows_app.views.pagination import encode

pytestmark = pytest.mark.django_db

HTMX = {"HX-Request": "true", "HX-Target": "instance-results"}
ATTRIBUTES = {"customer": "customer.id", "email": "contact.email", "amount": "amount"}


@pytest.fixture
def orders():
    make_definition("orders", search_attributes=ATTRIBUTES)
    return {
        key: start(
            "orders",
            key,
            customer={"id": customer},
            contact={"email": email},
            amount=amount,
        )
        for key, customer, email, amount in (
            ("ORD-54020-76", "C-349", "Ann@Example.com", 12.5),
            ("ORD-54021-77", "c-350", "bob@example.com", 900),
            ("TRIP-11-1", "C-349", None, True),
        )
    }


def keys(response) -> list[str]:
    assert response.status_code == 200
    return sorted(i.business_key for i in response.context["page"].rows)


def errors(response) -> str:
    return " ".join(
        m for field in response.context["filter"].form.errors.values() for m in field
    )


def test_business_key_prefix_in_any_case(orders, viewer):
    client = logged_in(viewer)
    assert keys(client.get("/instances/?q=ord-54020-76")) == ["ORD-54020-76"]
    assert keys(client.get("/instances/?q=ORD-5402")) == [
        "ORD-54020-76",
        "ORD-54021-77",
    ]
    assert keys(client.get("/instances/?q=  Ord-540  ")) == [
        "ORD-54020-76",
        "ORD-54021-77",
    ]
    assert keys(client.get("/instances/?q=RD-54")) == []  # a prefix, not a substring
    # LIKE's wildcards are plain characters.
    assert keys(client.get("/instances/?q=ORD-5402_")) == []
    assert keys(client.get("/instances/?q=%25")) == []


def test_instance_id_prefix_short_id_and_full_uuid(orders, viewer):
    client = logged_in(viewer)
    instance = orders["ORD-54021-77"]
    short = str(instance.pk)[:8]
    # The list shows the short id under the key: searching it finds the row.
    assert short in client.get("/instances/").content.decode()
    assert keys(client.get(f"/instances/?q={short}")) == ["ORD-54021-77"]
    assert keys(client.get(f"/instances/?q={short.upper()}")) == ["ORD-54021-77"]
    assert keys(client.get(f"/instances/?q={instance.pk}")) == ["ORD-54021-77"]
    assert keys(client.get(f"/instances/?q={str(instance.pk)[:13]}")) == [
        "ORD-54021-77"
    ]


def test_search_attributes_name_value(orders, viewer):
    client = logged_in(viewer)
    assert keys(client.get("/instances/?q=customer:c-349")) == [
        "ORD-54020-76",
        "TRIP-11-1",
    ]
    assert keys(client.get("/instances/?q=customer:C-349 ord")) == ["ORD-54020-76"]
    assert keys(client.get("/instances/?q=email:ann@example.com")) == ["ORD-54020-76"]
    assert keys(client.get("/instances/?q=amount:900")) == ["ORD-54021-77"]
    assert keys(client.get("/instances/?q=amount:12.5")) == ["ORD-54020-76"]
    assert keys(client.get("/instances/?q=amount:true")) == ["TRIP-11-1"]
    both = "/instances/?q=customer:c-349 email:bob@example.com"
    assert keys(client.get(both)) == []
    assert keys(client.get('/instances/?q=customer:"c-349"')) == [
        "ORD-54020-76",
        "TRIP-11-1",
    ]


def test_many_matches_are_searched_in_one_query_with_the_same_rows(
    orders, viewer, monkeypatch
):
    """Up to PROBE_LIMIT matches the list pages over their ids (PostgreSQL);
    beyond it, over the search's conditions: the same rows either way."""
    client = logged_in(viewer)
    queries = ("customer:c-349", "ord-5402", "customer:c-349 ord")
    probed = [keys(client.get(f"/instances/?q={q}")) for q in queries]
    monkeypatch.setattr(search, "PROBE_LIMIT", 1)
    assert [keys(client.get(f"/instances/?q={q}")) for q in queries] == probed
    assert probed[0] == ["ORD-54020-76", "TRIP-11-1"]
    # No match and a page cursor: an empty page, not an error.
    cursor = encode("n", timezone.now(), uuid.uuid4())
    empty = client.get(f"/instances/?q=zzz&cursor={cursor}")
    assert empty.status_code == 200 and keys(empty) == []


def test_unknown_attribute_and_bad_search_are_form_errors_without_rows(orders, viewer):
    client = logged_in(viewer)
    response = client.get("/instances/?q=custmer:c-349")
    assert keys(response) == []
    assert "No workflow declares the search attribute 'custmer'" in errors(response)
    assert "declared: amount, customer, email" in errors(response)
    page = response.content.decode()
    assert 'id="filter-errors"' in page and "custmer" in page
    assert keys(client.get("/instances/?q=customer:")) == []  # a plain prefix
    assert "customer" in errors(client.get('/instances/?q=customer:""'))
    assert client.get("/instances/?q=%00").status_code == 200
    # A business key with a colon is found in double quotes.
    start("orders", "note:7")
    assert keys(client.get('/instances/?q="note:7"')) == ["note:7"]
    many = "+".join(f"k{n}" for n in range(11))
    assert "at most 10" in errors(client.get(f"/instances/?q={many}"))


def test_state_and_status_are_one_filter(orders, viewer):
    client = logged_in(viewer)
    assert len(keys(client.get("/instances/?state=accepted"))) == 3
    assert len(keys(client.get("/instances/?status=accepted"))) == 3
    assert keys(client.get("/instances/?status=completed")) == []
    assert keys(client.get("/instances/?status=finished")) == []
    # The form shows ?status= as the chosen state (its select keeps it).
    response = client.get("/instances/?status=completed")
    assert response.context["filter"].form["state"].value() == "completed"
    same = client.get("/instances/?state=completed&status=completed")
    assert keys(same) == [] and errors(same) == ""
    conflict = client.get("/instances/?state=accepted&status=completed")
    assert keys(conflict) == []  # refused, not the unfiltered list
    assert "disagree" in errors(conflict)
    assert "disagree" in conflict.content.decode()
    several = client.get("/instances/?status=accepted&status=completed")
    assert keys(several) == [] and "one state at a time" in errors(several)


def test_htmx_apply_carries_save_and_act_on_all(orders, operator, viewer):
    """The filters' htmx answer is the results part; what depends on the
    filters (save this list, act on all matching, errors) is inside it."""
    client = logged_in(operator)
    partial = client.get("/instances/?q=ord&state=", headers=HTMX).content.decode()
    assert partial.lstrip().startswith('<section id="instance-results"')
    assert "Save this list as" in partial
    assert "Act on all matching" in partial
    assert "/bulk-jobs/new/?q=ord" in partial
    assert 'name="query" value="q=ord&amp;state="' in partial
    unfiltered = client.get("/instances/", headers=HTMX).content.decode()
    assert "Save this list as" not in unfiltered
    assert "Act on all matching" not in unfiltered
    # The link's bulk job selects by the same search.
    new_job = client.get("/bulk-jobs/new/?q=customer:c-349&status=accepted")
    assert new_job.status_code == 200
    assert new_job.context["description"] == ("Search: customer:c-349; State: accepted")
    refused = client.get("/instances/?q=nope:1", headers=HTMX).content.decode()
    assert 'id="filter-errors"' in refused and "Save this list as" not in refused
    # A viewer may save a list but not act on it.
    as_viewer = logged_in(viewer).get("/instances/?q=ord", headers=HTMX)
    assert "Save this list as" in as_viewer.content.decode()
    assert "Act on all matching" not in as_viewer.content.decode()


def test_repair_of_the_input_updates_the_attributes(orders, operator):
    instance = orders["ORD-54021-77"]
    repair.instance_repair_input(
        instance.pk,
        user=operator,
        reason="customer merged",
        new_input={**instance.input, "customer": {"id": "C-1"}},
    )
    stored = WorkflowInstance.objects.get(pk=instance.pk).search_attributes
    assert stored == {"customer": "c-1", "email": "bob@example.com", "amount": "900"}


def test_declarations_are_validated_and_extracted():
    assert declaration_errors(ATTRIBUTES) == []
    assert declaration_errors([]) != []
    assert declaration_errors({"Customer": "a"})  # names are lower-case
    assert declaration_errors({"1x": "a"})
    assert declaration_errors({"x": "a..b"})
    assert declaration_errors({"x": "a b"})
    assert declaration_errors({"x": 3})
    assert declaration_errors({f"a{n}": "a" for n in range(21)})
    data = {"customer": {"id": " C-9 "}, "items": [{"sku": "X1"}], "n": None}
    declared = {"customer": "customer.id", "sku": "items.0.sku", "n": "n", "m": "m"}
    assert extract(declared, data) == {"customer": "c-9", "sku": "x1"}
    assert extract({"c": "customer"}, data) == {}  # an object is not indexed
    definition = make_definition(
        "v", search_attributes={"Bad Name": "x"}, publish=False
    )
    with pytest.raises(ValidationError, match="not a valid attribute name"):
        definition.full_clean()
    definition.search_attributes = {"customer": "customer.id"}
    definition.full_clean()
    # A new draft keeps the declarations.
    definition.search_attributes = ATTRIBUTES
    definition.save()
    assert definition.new_draft().search_attributes == ATTRIBUTES


def test_reindex_gives_older_instances_newly_declared_attributes(orders):
    make_definition("plain")
    old = start("plain", "p-1", customer={"id": "C-77"})
    assert old.search_attributes == {}
    newer = make_definition("plain", version=2, search_attributes=ATTRIBUTES)
    assert newer.is_published
    out = StringIO()
    call_command("reindex_search_attributes", definition=["plain"], stdout=out)
    assert "plain: 1 instances changed" in out.getvalue()
    old.refresh_from_db()
    assert old.search_attributes == {"customer": "c-77"}
    call_command("reindex_search_attributes", batch=1, stdout=out)  # idempotent
    assert "orders: 0 instances changed" in out.getvalue()


@pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the indexes are PostgreSQL's"
)
def test_search_plans_use_the_indexes(orders):
    """On a small table PostgreSQL would rather scan it; with sequential
    scans priced out, the plan shows which index serves each search."""
    base = WorkflowInstance.objects.order_by()

    def plan(text: str) -> str:
        qs = search.conditions(base, search.parse(text))
        sql, params = qs.query.sql_with_params()
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL enable_seqscan = off")
            cursor.execute(f"EXPLAIN {sql}", params)
            return "\n".join(row[0] for row in cursor.fetchall())

    prefix = plan("ord-5402")
    assert "instance_business_key_upper" in prefix, prefix
    assert "Index Cond" in prefix and "~>=~" in prefix, prefix  # a range, no filter
    attribute = plan("customer:c-349")
    assert "instance_search_attributes" in attribute, attribute
    assert "@>" in attribute
    short_id = plan(str(orders["TRIP-11-1"].pk)[:8])
    assert "workflows_app_workflowinstance_pkey" in short_id, short_id
    assert "instance_business_key_upper" in short_id, short_id  # OR of both


def test_the_search_hint_shows_terms_that_find_something(viewer):
    """The hint's examples come from the data: each one, searched, finds
    the newest instance; an empty database shows no example at all."""
    client = logged_in(viewer)
    page = client.get("/instances/").content.decode()
    assert "e.g." not in page and "c-349" not in page
    make_definition("orders", search_attributes=ATTRIBUTES)
    newest = start("orders", "ORD-77123-5", customer={"id": "C-88"}, amount=4)
    terms = search.examples()
    assert terms == ["ord-7712", str(newest.pk)[:8], "customer:c-88"]
    response = client.get("/instances/")
    field = response.context["filter"].form.fields["q"]
    assert field.widget.attrs["placeholder"] == "e.g. " + " or ".join(terms)
    for term in terms:
        assert term in field.help_text
        assert keys(client.get("/instances/", {"q": term})) == ["ORD-77123-5"]
    # A key with spaces and colons is quoted; so is a value with spaces.
    start("orders", "order 7: rush", customer={"id": "Jane Doe"})
    terms = search.examples()
    assert terms[0] == '"order 7:"' and terms[2] == 'customer:"jane doe"'
    for term in terms:
        assert keys(client.get("/instances/", {"q": term})) == ["order 7: rush"]
