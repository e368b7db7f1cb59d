from django.urls import include, path

urlpatterns = [
    path("v1/", include("registry.v1.urls")),
    path("api/", include("registry.api.urls")),
]
