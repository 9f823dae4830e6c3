from django.contrib import admin
from django.urls import include, path

from urza.api.docs import DocsPage, SchemaApi
from urza.api.health import HealthzApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("urza.api.urls")),
    path("api/v1/", include("tamiyo.api.urls")),
    path("api/schema/", SchemaApi.as_view(), name="schema"),
    path("api/docs/", DocsPage.as_view(url_name="schema"), name="api-docs"),
    path("healthz", HealthzApi.as_view(), name="healthz"),
]

handler400 = "urza.api.errors.json_bad_request"
handler404 = "urza.api.errors.json_not_found"
handler500 = "urza.api.errors.json_server_error"
