"""What a person opens in a browser: a job's report, a batch's gallery, the depth chart.

files = render_report(manifest)   # {"index.html": ..., "depth.svg": ...}
"""

from worker.report.job import render_report

__all__ = ["render_report"]
