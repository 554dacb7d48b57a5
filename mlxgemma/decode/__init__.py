"""The decode core: sampling options (checked once) and the sampler with a per-request key (sampling.py),
the text stream that decides every finish (stream.py), the one loop over a batch of rows that samples and
checks speculative proposals with per-row rollback (decoder.py), the proposers (proposers.py), requests into
token ids and caches (prompt.py), grammar masks (constrained.py), Gemma 4's native output format
(gemma4_format.py) and several image prompts at once (batch.py). generate, chat and the server's scheduler all
decode through it."""
