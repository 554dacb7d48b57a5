"""Media inputs: image processors (Gemma 3, T5Gemma 2) and the image features they feed to a model, with the
per-process feature cache. Nothing here decodes tokens."""
