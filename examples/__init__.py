"""Worked examples for handler authors (see docs/handlers.md); each is run by a test."""
