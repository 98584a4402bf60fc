"""Helpers shared by tests: polling (`wait`), documentation blocks (`docs`).

Tests import from here, never from another test module or from conftest.
"""
