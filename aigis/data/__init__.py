"""Datasets: the CDDB layout loader and the synthetic CDDB-style benchmark."""
