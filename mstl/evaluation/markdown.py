"""Markdown tables for the compare report: one way to write a header and a row."""

from __future__ import annotations


def table_head(names: list[str]) -> list[str]:
    """A Markdown table's header and separator lines, the separator derived from the header."""
    return [table_row(names), "|" + " --- |" * len(names)]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"
