"""Running it: the CLI, the server's run directory and checkpoints, the local deployment."""
