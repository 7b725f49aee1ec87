"""node-agent: supervises llama-server on the GPU box, switches P-states, sleeps when idle."""
