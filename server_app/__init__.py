"""The Flower ServerApp: the language model and the server half of the compressor."""
