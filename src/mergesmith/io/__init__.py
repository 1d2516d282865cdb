"""Input and output: model resolution and indexing, and the streaming safetensors writer."""
