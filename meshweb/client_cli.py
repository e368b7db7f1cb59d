"""Client commands of `mesh` (filled in by the CLI module)."""


def add_commands(sub) -> None:
    return None
