"""The decode core: sampling options (validated once) and the sampler with a per-request key, constraints
(grammar masks), the text stream that decides every finish, the batched step that samples and verifies
speculative proposals with per-row rollback, and the proposers (draft model, prompt lookup).
generate, chat and the server's scheduler all decode through it."""
