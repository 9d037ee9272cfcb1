"""Reports people want to read: HTML pages per run, an index, comparisons across runs, CSV/Markdown tables.

``render_run`` writes ``reports/<run-id>.html``; ``render_index`` writes ``reports/index.html``;
``render_many`` puts several runs side by side; ``export_tables`` writes ``reports/<run-id>/<suite>.csv``
and ``.md``; ``summary_table`` is the plain-text table of the pytest terminal summary.
"""

from harness.report.render import render_index, render_many, render_run
from harness.report.tables import export_tables, summary_table

__all__ = ["export_tables", "render_index", "render_many", "render_run", "summary_table"]
