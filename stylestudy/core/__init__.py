"""Params, the command line every stage shares, and outputs written whole."""
