"""The tiny T5 of the data tests (made on the spot; see cogvx_mega.data.tiny_models)."""
from cogvx_mega.data.tiny_models import caption_corpus, make_tiny_t5  # noqa: F401
