"""Health checking for checks on the control plane's node (filled in later)."""


def tick() -> dict:
    return {}
