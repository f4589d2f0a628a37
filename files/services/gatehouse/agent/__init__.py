"""The desktop agent stand-in: launch-session on 60443, a session endpoint that echoes, load reports."""
