"""The admin site: Django's, with every model admin's bulk actions guarded against a forged
selection (ids that are not ids of the model), which Django would answer with a 500."""

from __future__ import annotations

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.apps import AdminConfig
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect


class SafeActions:
    """A bulk action on a selection that is not made of this model's ids is refused with
    a message, not run."""

    def response_action(self, request, queryset):
        pk = self.model._meta.pk
        try:
            for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
                pk.to_python(value)
        except ValidationError:
            self.message_user(
                request,
                "The selection holds values that are not ids of this model; nothing was done.",
                messages.ERROR,
            )
            return HttpResponseRedirect(request.get_full_path())
        return super().response_action(request, queryset)


class EsperAdminSite(admin.AdminSite):
    def register(self, model_or_iterable, admin_class=None, **options):
        admin_class = admin_class or admin.ModelAdmin
        if not issubclass(admin_class, SafeActions):
            admin_class = type(
                admin_class.__name__,
                (SafeActions, admin_class),
                {"__module__": admin_class.__module__},
            )
        super().register(model_or_iterable, admin_class, **options)


class EsperAdminConfig(AdminConfig):
    default_site = "esper_site.admin.EsperAdminSite"
