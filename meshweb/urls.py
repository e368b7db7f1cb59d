from django.urls import include, path
from django.views.generic import RedirectView

urlpatterns = [
    path("v1/", include("registry.v1.urls")),
    path("api/", include("registry.api.urls")),
    # The web admin UI; the bare address opens it.
    path("ui/", include("frontend.urls")),
    path("ui", RedirectView.as_view(url="/ui/", permanent=False)),
    path("", RedirectView.as_view(url="/ui/", permanent=False)),
]

# JSON errors under /api (HTML pages only for the UI): see registry.api.errors.
handler400 = "registry.api.errors.bad_request"
handler403 = "registry.api.errors.permission_denied"
handler404 = "registry.api.errors.page_not_found"
handler500 = "registry.api.errors.server_error"
