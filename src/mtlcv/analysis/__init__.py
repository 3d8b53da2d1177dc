"""Analysis: delta_m, tables, plots, reports."""
