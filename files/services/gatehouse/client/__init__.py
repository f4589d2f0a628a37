"""The test and demo client: runs a whole session through a CM and reports each step."""
