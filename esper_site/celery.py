"""Celery app: `celery -A esper_site worker -Q compile,train`."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "esper_site.settings")

app = Celery("esper_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
