"""History at the edge: what the proxy saw (requests, connections, wakes, GPU samples, power
states), kept in SQLite on the always-on box, and the energy that sleeping saved.

``records`` defines the rows, ``store`` writes them off the event loop, ``query`` reads them
back for the CLI (and a dashboard), ``timings`` pulls llama-server's own numbers out of a
response as it streams past, ``energy`` turns power states and samples into kWh.
"""
