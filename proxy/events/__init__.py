"""Events and notification webhooks.

The request path calls ``Emitter.emit`` (a non-blocking append to a bounded
buffer; rejection storms are aggregated). A background flusher fans events out
to a durable ``Outbox`` (Redis Streams or SQLite), one copy per matching
subscription; the ``DeliveryWorker`` signs them (Standard Webhooks), POSTs
them, retries with backoff and parks exhausted ones in a dead-letter list that
can be listed and replayed. ``Notifier`` bundles the three for the server.
"""
