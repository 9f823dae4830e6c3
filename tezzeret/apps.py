from django.apps import AppConfig


class TezzeretConfig(AppConfig):
    name = "tezzeret"
    verbose_name = "Tezzeret compiler"
    default_auto_field = "django.db.models.BigAutoField"
