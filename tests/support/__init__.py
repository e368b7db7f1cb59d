"""Helpers for tests that run real meshweb processes on loopback sockets."""
