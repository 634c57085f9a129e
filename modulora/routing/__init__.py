"""Reusing a library of adapters: the multi-expert layer, routers, and merging."""
