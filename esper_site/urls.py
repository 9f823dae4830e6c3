from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.permissions import AllowAny

from urza.api.health import HealthzApi

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("urza.api.urls")),
    path("api/v1/", include("tamiyo.api.urls")),
    path(
        "api/schema/",
        SpectacularAPIView.as_view(permission_classes=[AllowAny], authentication_classes=[]),
        name="schema",
    ),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(
            url_name="schema", permission_classes=[AllowAny], authentication_classes=[]
        ),
        name="api-docs",
    ),
    path("healthz", HealthzApi.as_view(), name="healthz"),
]

handler400 = "urza.api.errors.json_bad_request"
handler404 = "urza.api.errors.json_not_found"
handler500 = "urza.api.errors.json_server_error"
