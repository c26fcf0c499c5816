"""Local stack and test infrastructure: real servers from PyPI and the service processes."""
