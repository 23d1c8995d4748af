"""Small runnable examples: ``python -m foveal.examples.<name>``."""
