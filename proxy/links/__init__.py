"""Short links: codes, validation, the link model, stores (SQLite and Redis), analytics.

Pure logic (``codes``, ``validate``, ``model``, ``analytics``, ``cache``,
``settings``) is kept apart from I/O (``sqlite_store``, ``redis_store``); both
stores implement ``store.LinkStore`` with the same behaviour. The HTTP wiring
(redirect handler, admin API) lives elsewhere and only calls into this package.
"""
