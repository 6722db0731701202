"""Integrations with training frameworks (imported on demand: each pulls in its framework)."""
