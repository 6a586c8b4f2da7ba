"""Loopback stand-ins for cloud APIs (fake TPU API server, enforcing GCS JSON-API server)."""
