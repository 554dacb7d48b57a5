"""Embeddings: inputs (text, token ids, and for EmbeddingGemma 2 images and audio) into vectors, batched."""
