"""Tests of the NBD server (protocol layer) with real clients and raw sockets."""
