"""Text conditioning for text-to-image models: the T5 encoder, its feature cache and prompt files."""
