"""Waking a node: the wake state machine (pure), its driver, magic packets."""
