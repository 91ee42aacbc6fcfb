"""Backend state and the lean HTTP/1.1 keep-alive client that talks to runtimes."""
