from django.apps import AppConfig


class CloudsConfig(AppConfig):
    name = "clouds"
    verbose_name = "meshweb cloud accounts"
    default_auto_field = "django.db.models.BigAutoField"
