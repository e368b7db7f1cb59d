"""The cloud providers, by name: the one table the engine looks providers up in."""

from __future__ import annotations

from importlib import import_module

from clouds.providers.base import AccountSpec, Provider

PROVIDERS: dict[str, str] = {
    "aws": "clouds.providers.aws.AWSProvider",
}


def provider_class(name: str) -> type[Provider]:
    """The class of provider `name`; KeyError for one that is not in the table."""
    module, _, cls = PROVIDERS[name].rpartition(".")
    return getattr(import_module(module), cls)


def open_provider(name: str, account: AccountSpec) -> Provider:
    return provider_class(name)(account)
