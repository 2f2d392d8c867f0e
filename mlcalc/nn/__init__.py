"""Shared neural-network pieces: scatter helpers, bases, SO(3) utilities."""
