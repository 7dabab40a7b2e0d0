"""The `control` fixture: a running embedded control server (owned by the control package)."""
