"""Alerts at the proxy, which stays up while the node sleeps: ``policy`` (pure: which
observations are alerts, and which may go out now) and ``runner`` (log, metric, command)."""
