"""The admin's usage dashboard: charts and tables read from the hourly rollups
(``UsageRollup``), never from the ledger; live budgets and health from ``quotas.services``.

- ``charts``: server-rendered inline SVG (no JavaScript, no CDN), coloured with the admin's
  CSS variables so it reads in the light and the dark theme;
- ``figures``: the rollup queries (a few grouped queries, bounded by hours, not by traffic);
- ``views``: the admin pages (``DashboardAdmin``) and the ledger's sums and CSV export.
"""
