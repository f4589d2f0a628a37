"""Gatehouse services: broker, connection manager, security gateway, desktop agent and client."""

__version__ = "0.1.0"
