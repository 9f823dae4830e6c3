"""Registry reads."""

from __future__ import annotations

import django_filters
from django.db.models import QuerySet

from urza.errors import ApplicationError
from urza.models import Blueprint, Kernel


class BlueprintFilter(django_filters.FilterSet):
    tag = django_filters.CharFilter(field_name="tags__name")
    name = django_filters.CharFilter()
    source = django_filters.ChoiceFilter(choices=Blueprint.Source.choices)
    status = django_filters.ChoiceFilter(choices=Blueprint.Status.choices)

    class Meta:
        model = Blueprint
        fields = ["tag", "name", "source", "status"]


class KernelFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=Kernel.Status.choices)
    blueprint = django_filters.UUIDFilter(field_name="blueprint_id")

    class Meta:
        model = Kernel
        fields = ["status", "blueprint"]


def filtered(filterset_class, queryset: QuerySet, filters: dict | None) -> QuerySet:
    filterset = filterset_class(filters or {}, queryset)
    if not filterset.is_valid():
        errors = {k: [str(e) for e in v] for k, v in filterset.errors.items()}
        raise ApplicationError(
            "invalid filter: " + "; ".join(f"{k}: {v[0]}" for k, v in errors.items()),
            detail=errors,
        )
    return filterset.qs.distinct()


def blueprint_list(*, filters: dict | None = None) -> QuerySet[Blueprint]:
    qs = Blueprint.objects.prefetch_related("tags").select_related("created_by")
    return filtered(BlueprintFilter, qs, filters)


def kernel_list(*, filters: dict | None = None) -> QuerySet[Kernel]:
    return filtered(KernelFilter, Kernel.objects.all(), filters)


def blueprint_get(*, blueprint_id) -> Blueprint:
    blueprint = Blueprint.objects.prefetch_related("tags").filter(pk=blueprint_id).first()
    if blueprint is None:
        raise ApplicationError(f"no blueprint {blueprint_id}", code="not_found", status=404)
    return blueprint


def kernel_get(*, kernel_id) -> Kernel:
    kernel = Kernel.objects.filter(pk=kernel_id).first()
    if kernel is None:
        raise ApplicationError(f"no kernel {kernel_id}", code="not_found", status=404)
    return kernel
