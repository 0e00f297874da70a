"""Stage 5, report: report.json, report.md and the plots (``render``)."""
