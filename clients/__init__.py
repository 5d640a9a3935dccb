"""Clients of the service: the typed Python client (client.py) and the qjscore CLI (cli.py)."""
