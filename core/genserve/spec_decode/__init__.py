"""Speculative decoding: proposers offer tokens, the target model verifies them in one step.

Each decode step a *proposer* (a plugin: ``genserve_register_spec_proposers``) offers up to
``k`` tokens per sequence; the step computes the last known token and the proposals together
(``k + 1`` query rows through the paged KV cache, the prefill/chunked path of the attention
kernels), samples a token at every row with the request's own sampler, and keeps the longest
prefix of proposals that equal the tokens sampled, plus the token sampled after it
(``verify.accepted_prefix``). See docs/speculative.md.
"""
