"""Reporting helpers behind ``python -m varq.tables``: rows, published numbers, layouts, renderers, plots, HTML."""
