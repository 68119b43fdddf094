"""Shared test helpers (real parts: proxies, servers, clients)."""
