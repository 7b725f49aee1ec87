"""Helpers shared by the tests: free loopback ports and a real llama-server under trio."""
