"""Scoring generated images: samples and manifests, CLIP embeddings, statistics."""
