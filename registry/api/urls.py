"""The product REST API (`/api/...`)."""

urlpatterns: list = []
