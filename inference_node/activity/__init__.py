"""Activity of each instance from its llama-server log: parser, busy tracker, /slots check."""
