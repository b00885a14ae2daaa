"""Merchandiser reports: what the stored compliance snapshots mean for the people who fix shelves.

- `cloud_api.reports.data`: snapshots -> KPIs, aggregates (store, region, category, brand), daily trends,
  the task list ordered by impact, CSV rows. Pure Python over the rows ingest stored.
- `cloud_api.reports.directory`: report metadata the snapshot table does not hold (store names and
  regions, planogram geometry for the bay drawing), kept in object storage.
- `cloud_api.reports.views`: shelf-photo overlay and planogram drawing (SVG geometry), status colours.
- `cloud_api.reports.loader`: a synthetic world -> snapshots through the real ingest path (tests, demo).

The HTTP side lives in `cloud_api.api.routes.reports` (JSON, CSV) and `reports_pages` (HTML).
"""
