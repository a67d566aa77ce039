"""Reports of measured sparsity: the short CLI summary (summary.py), results files and leaderboard rows
(table.py), plots (plots.py), the self-contained HTML page (html.py), and the `lm-sparse report` (cli.py),
`check` (check.py) and `sweep` (sweep.py) commands."""
