"""EmoVerse Edge: an affective multimodal LLM, trained, compressed, exported and benchmarked for edge devices."""

__version__ = "0.1.0"
