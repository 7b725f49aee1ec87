"""TCP routes: accept, hold while the node wakes, then relay bytes both ways."""
