"""`/v1/session/...` (routes listed in `urlpatterns`)."""

urlpatterns: list = []
