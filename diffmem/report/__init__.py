"""The privacy report: report.html and report.json from the results of the other commands."""
