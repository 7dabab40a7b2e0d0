"""ts-supervisor: keeps many Tailscale proxies (tailscaled + tailscale serve) alive on one host."""

__version__ = "0.1.0"
