"""Releases: the quality gate, the signed release directory (written and read), its provenance, and
the report card."""
