"""Short links: codes, validation, the link model, stores (SQLite and Redis), analytics.

Pure logic (``codes``, ``validate``, ``model``, ``analytics``, ``cache``,
``settings``) is kept apart from I/O (``sqlite_store``, ``redis_store``); both
stores implement ``store.LinkStore`` with the same behaviour. The HTTP wiring
(redirect handler, admin API) lives elsewhere and only calls into this package.

The redirect path, as the HTTP layer is expected to run it::

    link = cache.get(code)                      # MISSING -> await store.get(code), cache.put
    None                                        -> 404
    resolve(link, now, 0) is Expired            -> 410
    not await store.take_click(code, link.max_clicks)   -> 410 (over the cap; atomic)
    index, variant = choose_variant(link, cookie, rng) or (None, None)
    status = link.status or redirects.status
    answer status, Location: variant.url or link.url,
           Cache-Control: cache_control(link, status, now),
           Set-Cookie: <sticky_cookie>=variant.key; Path=<prefix><code> (with variants)
    then, off the response path: store.record_click(code, at=now,
           referrer_host=referrer_host(Referer), ua_family=ua_family(User-Agent),
           variant=index, visitor=<keyed hash of cookie or IP + UA>)
"""
