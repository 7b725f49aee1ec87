"""Models on demand: which instances are loaded, decided by one scheduler.

``policy`` is the pure decision (load, evict, wait, refuse; TTL unloads); ``service`` feeds
it from the supervisor and the activity tracker and carries its decisions out.
"""
