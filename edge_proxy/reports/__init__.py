"""What nodes report to the proxy: ``intake`` (each record once, in order, then stored and
shown to the alerts) and ``sink`` (where stored records go)."""
