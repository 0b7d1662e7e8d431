"""Model folders: checking, loading and copying them, random builders, the Hub, and the model families."""
