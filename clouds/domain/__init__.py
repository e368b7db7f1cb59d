"""The cloud accounts' domain: accounts, the sync engine, gateway configuration."""
