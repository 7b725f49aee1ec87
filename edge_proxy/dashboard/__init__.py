"""The proxy's dashboard at ``/`` on the control listener: each node's power timeline, its
wakes step by step, requests per model (time to first token, tokens/s), GPU samples, the
energy sleeping saved this week, and what each node serves now.

``source`` names the history queries the dashboard reads, ``summary`` turns rows and the
proxy's status into the JSON the page polls (pure), ``routes`` serves the page and that JSON.
The page itself is ``index.html`` + ``dashboard.js``, shipped as package data.
"""
