"""``make bench``: Sluice measured beside its baselines, in one bounded run.

``python -m bench`` starts, on loopback only, each in its own process:

* a fast upstream: nginx answering ``return 200`` with a small fixed body
  (~10 us of CPU per request, against ~45 us for a minimal aiohttp server,
  so on two cores the upstream takes as little as possible from the proxy);
* every target of ``targets.TARGETS``: the upstream itself, Sluice, nginx
  ``proxy_pass`` and a bare aiohttp forwarder (``bare_forwarder.py``).

Each target is then loaded with wrk three ways, interleaved in rounds:
"loaded" (throughput: -t1 -c32), "paced" (a moderate rate: ``paced.lua``)
and "unloaded" (one connection: added latency without queueing). The report
gives medians over rounds, ratios paired within rounds, CPU per request of
each target, and how busy other processes kept the machine meanwhile; it is
also written to ``bench/results/latest.json``. By default the target runs
alone on one CPU, wrk and the upstream on the other (``procs.LAYOUTS``).
Everything started is stopped by PID, also on Ctrl-C or SIGTERM.
``--quick`` is a ~20 s smoke run.
"""
