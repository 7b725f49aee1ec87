"""edge-proxy: relays TCP/HTTP to a GPU box and wakes it with Wake-on-LAN when it sleeps."""
