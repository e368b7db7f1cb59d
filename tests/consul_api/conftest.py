"""Fixtures shared with the agent tests: a module's control plane and real `mesh agent`s."""

from tests.agents.conftest import control_plane, make_agent  # noqa: F401
