"""The JSON API for machine clients (/api/v1/, DESIGN.md section 6).

It authenticates API tokens, validates input strictly, calls engine commands
(``instance_start``, ``callback_report``, ``event_ingest``) and reads with the
selectors in ``queries``; it never changes a state itself.
"""

from __future__ import annotations
