"""The results page: figures and tables."""
