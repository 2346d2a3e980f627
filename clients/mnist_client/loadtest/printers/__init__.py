"""Printers: the same report as a terminal table, JSON, CSV, or a self-contained HTML page."""

from mnist_client.loadtest.printers.csv_out import csv_rows, format_csv, write_csv
from mnist_client.loadtest.printers.html import format_html, write_html
from mnist_client.loadtest.printers.table import format_table

__all__ = ["csv_rows", "format_csv", "format_html", "format_table", "write_csv", "write_html"]
