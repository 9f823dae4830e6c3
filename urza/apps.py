from django.apps import AppConfig


class UrzaConfig(AppConfig):
    name = "urza"
    verbose_name = "Urza registry"
    default_auto_field = "django.db.models.BigAutoField"
