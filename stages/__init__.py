"""Stage scripts of the sketch-style study; run each as `python -m stages.<name>`."""
