"""Idle checks, the suspend policy, the suspend/resume sequence."""
