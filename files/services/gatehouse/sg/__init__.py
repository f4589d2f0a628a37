"""The security gateway: TLS 4172/tcp grant check and relay to agents, 4172/udp relay."""
