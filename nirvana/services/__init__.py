"""Embedded infrastructure for development, tests and ``nirvana up`` (no Docker needed)."""
