"""Warehouses: the protocol (base.py) and one module per warehouse."""
