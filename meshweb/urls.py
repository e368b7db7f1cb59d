from django.urls import include, path
from django.views.generic import RedirectView

from meshweb.install import views as install_views

urlpatterns = [
    # The agent install script (`curl -fsS .../install.sh?token=... | sh`) and its wheel.
    path("install.sh", install_views.install_script, name="install-script"),
    path("downloads/<str:name>", install_views.download, name="downloads"),
    path("v1/", include("registry.v1.urls")),
    # Cloud accounts and gateway config first: `/api/` ends with a catch-all 404.
    path("api/", include("clouds.urls")),
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
