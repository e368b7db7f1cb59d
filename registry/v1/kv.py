"""`/v1/kv/...` (routes listed in `urlpatterns`)."""

urlpatterns: list = []
