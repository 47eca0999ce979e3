"""ModelPress client: the Python SDK (sdk.py) and the command-line commands (cli.py)."""
