from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workflows_app.settings")
application = get_wsgi_application()

# What the first request would load lazily (URLconf, views, templates) is
# loaded now, before this process takes a request.
from workflows_app.startup import load_for_first_request  # noqa: E402

load_for_first_request()
