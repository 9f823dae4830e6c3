from django.urls import path

from urza.api import views

app_name = "urza-api"

urlpatterns = [
    path("blueprints/", views.BlueprintListCreateApi.as_view(), name="blueprints"),
    path("blueprints/<uuid:blueprint_id>/", views.BlueprintDetailApi.as_view(), name="blueprint"),
    path("kernels/", views.KernelListCreateApi.as_view(), name="kernels"),
    path("kernels/<uuid:kernel_id>/", views.KernelDetailApi.as_view(), name="kernel"),
    path(
        "kernels/<uuid:kernel_id>/artifact/",
        views.KernelArtifactApi.as_view(),
        name="kernel-artifact",
    ),
]
