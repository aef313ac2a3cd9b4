"""Shared constants imported by several DAGs."""

REGIONS = ("emea", "amer", "apac")
