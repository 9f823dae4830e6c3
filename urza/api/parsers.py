from __future__ import annotations

from django.conf import settings
from rest_framework.parsers import JSONParser

from urza.errors import ApplicationError


class BoundedJSONParser(JSONParser):
    """JSON bodies up to `DATA_UPLOAD_MAX_MEMORY_SIZE` bytes; larger ones get a 413."""

    def parse(self, stream, media_type=None, parser_context=None):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        request = (parser_context or {}).get("request")
        declared = 0
        if request is not None:
            try:
                declared = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                declared = 0
        if limit is not None and declared > limit:
            raise ApplicationError(
                f"request body is {declared} bytes; the limit is {limit}",
                code="payload_too_large",
                status=413,
            )
        return super().parse(stream, media_type, parser_context)
