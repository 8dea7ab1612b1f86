"""Ebbtide's data plane (public API). Filled in as the engine lands."""
