"""Load at start-up what Django would otherwise load on a process's first
request, so that a restarted web process answers its first page as fast as
its second (issue 15: every page within 1 s of a restart).

Django imports the URLconf (and with it every view module, the API's schemas,
the admin) on the first ``resolve``, builds the reverse table on the first
``reverse``, and compiles each template on its first render; together that
cost 0.5–2.2 s on the first request of a fresh process. The WSGI entry point
calls :func:`load_for_first_request` once, in each web process, before it
takes a request. Nothing here touches the database: under ``gunicorn
--preload`` this runs in the master, whose connections forked workers must
not share.
"""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.cache import caches
from django.forms.renderers import get_default_renderer
from django.template import engines
from django.template.backends.django import DjangoTemplates
from django.urls import get_resolver
from django.utils import formats, translation
from django.utils.module_loading import import_string

from workflows_app.celery import app as celery_app


def load_for_first_request() -> None:
    resolver = get_resolver()
    # Cached properties, read for their side effect: the first imports the
    # root URLconf and every module it includes (views, API); the second
    # builds the reverse table that {% url %} and redirects use.
    _ = resolver.url_patterns, resolver.reverse_dict
    for engine in engines.all():
        if isinstance(engine, DjangoTemplates):
            _ = engine.engine.template_context_processors
            _compile_templates(engine)
    # Form widgets render through the form renderer's engine of their own.
    renderer_engine = getattr(get_default_renderer(), "engine", None)
    if isinstance(renderer_engine, DjangoTemplates):
        _compile_templates(renderer_engine)
    # Imported by name on first use: the session's serializer, the message
    # storage, the cache backend.
    import_string(settings.SESSION_SERIALIZER)
    import_string(settings.MESSAGE_STORAGE)
    _ = caches["default"]
    # Translation catalogues and the locale's date formats.
    with translation.override(settings.LANGUAGE_CODE):
        formats.get_format("DATETIME_FORMAT")
    # Celery's messaging layer, which the first task sent (or health check)
    # would set up; it opens no connection.
    _ = celery_app.amqp


def _compile_templates(engine: DjangoTemplates) -> None:
    """Compile every template in the engine's own folders (the project's; the
    form renderer's widgets) into its cached loader. Apps' folders stay lazy:
    the admin's are many, and only the admin's pages use them."""
    for directory in engine.engine.dirs:
        root = Path(directory)
        for path in sorted(root.rglob("*.html")):
            name = path.relative_to(root).as_posix()
            # Fails loudly at start-up on a broken template, rather than
            # on the request that first shows it.
            engine.get_template(name)
