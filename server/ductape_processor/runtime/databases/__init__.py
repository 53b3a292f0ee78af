"""Databases: the SQL actions a product's manifest declares, run on PostgreSQL, MySQL/MariaDB or SQLite.

`sql` compiles queries (named placeholders to bound parameters) and `plan` compiles a manifest's actions, once,
when it is validated (the registry keeps them on each resolved version); `statements` binds a call's input and wraps
the query; `runner` runs a call (or a batch) from input to rows; `pools` keeps one adapter per database
environment; `errors` maps adapter failures to statuses; `values` converts column values. Import from those
modules: this package re-exports nothing, so the registry can import the plan without importing the runner.
"""
