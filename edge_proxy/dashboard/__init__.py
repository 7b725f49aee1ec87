"""The proxy's dashboard at ``/`` on the control listener: each node's power timeline (with
each GPU's busy spans), its wakes step by step, requests per model (time to first token,
tokens/s), GPU samples, TCP connections, the energy sleeping saved this week (in money with
a price), and what each node serves now.

``source`` names the history queries the dashboard reads, ``reading`` runs them for one
refresh (all of the window, or what is new since the page's ``cursor``), ``summary`` turns
rows and the proxy's status into the JSON the page polls (pure), ``routes`` serves the page
and that JSON.
The page itself is ``index.html`` + ``dashboard.js`` (+ ``merge.js``, what the page holds
between polls), shipped as package data.
"""
