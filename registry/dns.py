"""The DNS interface (answers Consul-style names); filled in by the DNS module."""


async def start_dns(host: str, port: int) -> None:
    return None
