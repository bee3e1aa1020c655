"""Project scripts: the services check and the docs build's hook."""
