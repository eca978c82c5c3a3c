"""``make bench``: Sluice measured beside its baselines, in one bounded run.

``python -m bench`` starts, on loopback only, each in its own process:

* a fast upstream: nginx answering ``return 200`` with a small fixed body
  (~10 us of CPU per request, against ~45 us for a minimal aiohttp server,
  so on two cores the upstream takes as little as possible from the proxy);
* every target of ``targets.TARGETS``: the upstream itself, Sluice with no
  rules, Sluice with one and with five Redis-backed rules (limits never
  reached), Sluice with one rule every request is over (429s from the local
  deny cache), nginx ``proxy_pass`` and a bare aiohttp forwarder
  (``bare_forwarder.py``); the Redis-backed variants share one redis-server;
* the short links and webhooks, all ``memory://``: Sluice answering a cached
  short link (``sluice-redirect``: ``GET /s/hot``, created through the admin
  API once it is up), the same with a webhook for every event (one
  ``redirect.followed`` per click), and Sluice answering 429 to every request
  with and without that webhook (rejections aggregated per client): paired
  ratios judged against the issue's targets (a redirect at least as fast as a
  proxied request; webhooks costing at most 5%), and whether webhook
  deliveries keep up. They run the "loaded" load only, for
  ``--links-duration`` seconds (``sluice-redirect`` also "paced"); after each
  run the harness waits until the target is idle again (its clicks' analytics
  are recorded after the answers) and reports that CPU, and webhook
  deliveries are paused outside the target's own runs (they fall behind).

Each target is then loaded with wrk three ways, interleaved in rounds:
"loaded" (throughput: -t1 -c32), "paced" (a moderate rate: ``paced.lua``)
and "unloaded" (one connection: added latency without queueing). The report
gives medians over rounds, ratios paired within rounds, CPU per request of
each target, and how busy other processes kept the machine meanwhile. For
the Redis-backed targets it counts the commands Redis ran during every run
(``INFO commandstats``, ``redis_stats.py``): storage round trips per request.
Then, on a fresh redis-server, it creates 100,000 clients per algorithm
through the real check script and keys and reports Redis memory per tracked
client (``redis_memory.py``). Everything is also written to
``bench/results/latest.json``, and the short table the README quotes to
``bench/results/latest.md``. By default the target runs alone on one CPU;
wrk, the upstream and Redis share the other (``procs.LAYOUTS``). Everything
started is stopped by PID, also on Ctrl-C or SIGTERM. A default run takes
about 5 minutes; ``--quick`` is a ~75 s smoke run.
"""
