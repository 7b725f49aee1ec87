"""Code both llamanap services use: config loading, errors, the agent/proxy event protocol,
HTTP and metrics helpers, systemd notify, logging, the tiny GGUF model writer, and ``web``
(serving the two services' pages and the JS and CSS they share)."""
