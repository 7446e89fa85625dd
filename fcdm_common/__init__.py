"""Helpers shared by every program of the repository (written once, imported everywhere)."""
