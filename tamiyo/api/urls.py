from django.urls import path

from tamiyo.api import views

app_name = "tamiyo-api"

urlpatterns = [
    path("runs/", views.RunListCreateApi.as_view(), name="runs"),
    path("runs/<uuid:run_id>/", views.RunDetailApi.as_view(), name="run"),
    path("runs/<uuid:run_id>/decisions/", views.DecisionApi.as_view(), name="decisions"),
    path(
        "experiences/<uuid:experience_id>/",
        views.ExperienceDetailApi.as_view(),
        name="experience",
    ),
    path("policies/", views.PolicyListApi.as_view(), name="policies"),
    path("policies/active/", views.PolicyActiveApi.as_view(), name="policy-active"),
    path("policies/train/", views.PolicyTrainApi.as_view(), name="policy-train"),
    path(
        "policies/<int:version>/activate/",
        views.PolicyActivateApi.as_view(),
        name="policy-activate",
    ),
]
