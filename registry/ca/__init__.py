"""The Connect CA: providers (`provider`), the state manager (`manager`), key
encryption at rest (`secrets`) and the CSR signing rate limit (`ratelimit`).

Entry points call `registry.domain.connect_ca`, never these modules directly
(except `mesh server`'s start-up, which calls `manager.ensure_initialized`).
"""
