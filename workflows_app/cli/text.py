"""The command line's documents (``cli.documents``) laid out for people:
compact tables, one instance per line, newest timeline rows last."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from workflows_app.templatetags.saga import age

ERROR_WIDTH = 60
REASON_WIDTH = 50
ATTEMPTS_SHOWN = 3


def clip(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%SZ") if value else "—"


def table(headers: list[str], rows: list[list[Any]], indent: str = "") -> str:
    """Left-aligned columns two spaces apart, trailing blanks stripped."""
    cells = [headers, *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join(
        indent
        + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def waits_for(row: dict[str, Any]) -> str:
    """Why an instance waits, in a word or two: its hold and whether it is stuck."""
    parts = [row["attention_kind"]] if row["attention_kind"] else []
    if row["stuck"]:
        parts.append(f"stuck:{row['stuck_kind'] or 'yes'}")
    return ",".join(parts) or "—"


def listing(document: dict[str, Any]) -> str:
    rows = document["instances"]
    if not rows:
        return "No instance matches."
    lines = table(
        ["ID", "DEFINITION", "BUSINESS KEY", "STATE", "WAITS FOR", "STEP", "V", "IDLE"],
        [
            [
                r["id"][:8],
                f"{r['definition']}@{r['definition_version']}",
                clip(r["business_key"], 40),
                r["state"],
                waits_for(r),
                r["blocked_step"] or "—",
                r["version"],
                age(r["last_progress_at"]),
            ]
            for r in rows
        ],
    )
    if document["more"]:
        lines += f"\n… more match: raise --limit (shown {len(rows)}) or narrow it."
    return lines


def _header(doc: dict[str, Any]) -> list[str]:
    lines = [
        f"{doc['business_key']}  ({doc['definition']} v{doc['definition_version']})",
        f"  id       {doc['id']}",
        f"  state    {doc['state']} (row version {doc['version']}): {doc['meaning']}",
    ]
    if doc["attention_reason"] or doc["attention_kind"]:
        lines.append(
            f"  waits    {doc['attention_kind'] or '—'}: {doc['attention_reason']}"
        )
    if doc["stuck"]:
        lines.append(
            f"  stuck    {doc['stuck_kind'] or 'yes'} for {age(doc['stuck_since'])}: "
            f"{doc['stuck_reason']}"
        )
    if doc["restart_position"] is not None:
        lines.append(
            f"  restart  undoing the steps from position {doc['restart_position']} "
            "on, then running them again"
        )
    lines.append(
        f"  times    accepted {when(doc['accepted_at'])}, last progress "
        f"{age(doc['last_progress_at'])} ago, deadline {when(doc['deadline_at'])}"
    )
    return lines


def _steps(doc: dict[str, Any]) -> list[str]:
    """The steps as a table, each followed by its latest attempts."""
    rows = [
        [
            ">" if s["blocking"] else "",
            s["position"],
            s["name"],
            s["state"] + (" (data repaired)" if s["data_repaired"] else ""),
            s["compensation_state"],
            f"{s['attempt']}/{s['attempts_allowed']}",
            s["run"],
            clip(s["last_error"], ERROR_WIDTH),
        ]
        for s in doc["steps"]
    ]
    headers = ["", "#", "STEP", "STATE", "COMPENSATION", "TRIES", "RUN", "LAST ERROR"]
    header, *lines = table(headers, rows, "  ").split("\n")
    out = ["Steps (> blocks the instance)", header]
    for step, line in zip(doc["steps"], lines, strict=True):
        out.append(line)
        for a in step["attempts"][-ATTEMPTS_SHOWN:]:
            error = f": {clip(a['error'], ERROR_WIDTH)}" if a["error"] else ""
            out.append(
                f"        {a['direction']} #{a['number']} (run {a['run']}) "
                f"{when(a['started_at'])} {a['outcome']}{error}"
            )
    return out


def _actions(doc: dict[str, Any]) -> list[str]:
    who = doc["actions_for"] or "an operator with every permission (--user NAME)"
    rows = [
        [
            a["name"],
            "yes" if a["allowed"] else "no",
            "four eyes" if a["needs_approval"] else "",
            a["why_not"] or a["label"],
        ]
        for a in doc["actions"]
    ]
    headers = ["ACTION", "NOW", "", "WHY NOT (OR WHAT IT IS)"]
    return [f"Actions for {who}", table(headers, rows, "  ")]


def show(doc: dict[str, Any]) -> str:
    lines = [*_header(doc), "", *_steps(doc), "", *_actions(doc)]
    if doc["approvals"]:
        lines += ["", "Waiting for a second operator"]
        lines += [
            f"  #{r['id']} {r['action']} requested by {r['requested_by']} "
            f"{age(r['requested_at'])} ago, expires {when(r['expires_at'])}: "
            f"{clip(r['reason'], REASON_WIDTH)}"
            for r in doc["approvals"]
        ]
    rows = doc["timeline"]["rows"]
    lines += ["", f"Timeline (last {len(rows)} of {doc['timeline']['total']})"]
    lines.append(
        table(
            ["AT", "STEP", "TRANSITION", "FROM → TO", "BY", "REASON"],
            [
                [
                    when(r["at"]),
                    r["step"] or "—",
                    r["transition"],
                    f"{r['source']} → {r['target']}" if r["target"] else "(note)",
                    r["actor"],
                    clip(r["reason"], REASON_WIDTH),
                ]
                for r in rows
            ],
            "  ",
        )
    )
    return "\n".join(lines)


def bulk_job(doc: dict[str, Any]) -> str:
    job, counts = doc["job"], doc["counts"]
    # A job that will run (or waits for approval) "will"; a preview "would".
    verb = "Would" if job["status"] == "cancelled" else "Will"
    lines = [
        f"Bulk job #{job['id']} ({job['status']}): {job['action']}, "
        f"planned by {job['created_by']}, on {job['description']}",
        f"{verb} act on {counts['acting']}:",
        *[f"  {r['count']:>6}  {r['plan']}" for r in doc["acting"]],
        f"{verb} skip {counts['skipped']}:",
        *[f"  {r['count']:>6}  {r['plan']}" for r in doc["skipped"]],
        "Per instance:",
    ]
    rows = [
        [
            i["instance"][:8],
            clip(i["business_key"], 40),
            f"v{i['seen_version']}",
            "act" if i["acts"] else "skip",
            i["plan"],
        ]
        for i in doc["items"]
    ]
    lines.append(table(["ID", "BUSINESS KEY", "SEEN", "", "PLAN"], rows, "  "))
    hidden = doc["items_total"] - len(doc["items"])
    if hidden:
        lines.append(f"  … and {hidden} more (--json lists every item)")
    return "\n".join(lines)
