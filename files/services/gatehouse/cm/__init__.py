"""The connection manager: the client-facing broker protocol in front of an upstream broker and agents."""
