"""One self-contained HTML page per run, evaluation and comparison (``report.html``)."""

from onestage.report.pages import write_compare_report, write_eval_report, write_run_report

__all__ = ["write_compare_report", "write_eval_report", "write_run_report"]
