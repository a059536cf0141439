"""The report, rendered from metrics alone: its tables, findings, figures and model cards."""
