"""Cloud accounts: import a cloud's own registry into the catalog, export mesh
services back, and the firewall rules mesh gateways need (AWS first)."""
