"""`/v1/acl/...` (routes listed in `urlpatterns`)."""

urlpatterns: list = []
