"""What people look at: `pages` (every HTML page, from templates/), `plots` (a run's plots) and
`compare_report` (`replicate report`: the compare table, figures and page)."""
