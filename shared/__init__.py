"""Code both llamanap services use: config loading, errors, the agent/proxy event protocol,
HTTP and metrics helpers, systemd notify, logging, and the tiny GGUF model writer."""
