"""Loomwork application layers: graph (document), engine (executor), cli and ui."""
