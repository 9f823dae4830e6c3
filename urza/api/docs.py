"""The OpenAPI schema and its Swagger page, read-only, with errors in the API's JSON shape."""

from __future__ import annotations

from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response


class _ReadOnlyJsonErrors:
    """GET and HEAD only; an error (405, a bad ``format``) is rendered as JSON in the API's
    error shape rather than by the page's own renderer (YAML, or an HTML template)."""

    http_method_names = ["get", "head"]
    permission_classes = [AllowAny]
    authentication_classes: list = []

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        if isinstance(response, Response) and response.status_code >= 400:
            response.accepted_renderer = JSONRenderer()
            response.accepted_media_type = "application/json"
        return response


class SchemaApi(_ReadOnlyJsonErrors, SpectacularAPIView):
    pass


class DocsPage(_ReadOnlyJsonErrors, SpectacularSwaggerView):
    pass
