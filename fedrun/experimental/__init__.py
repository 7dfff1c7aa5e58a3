"""Unproven work: kept working and tested, off by default, out of the main path until a
benchmark shows it earns its place (see README.md in this folder)."""
