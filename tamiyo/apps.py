from django.apps import AppConfig


class TamiyoConfig(AppConfig):
    name = "tamiyo"
    verbose_name = "Tamiyo controller"
    default_auto_field = "django.db.models.BigAutoField"
