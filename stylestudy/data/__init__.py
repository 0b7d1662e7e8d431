"""The dataset in its canonical form, where it comes from, and its encodings."""
