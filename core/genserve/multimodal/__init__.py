"""Images in prompts: decoding and fetching them (``images``), turning them into prompt tokens
and pixel tensors with the model's own processor (``processor``), the per-request inputs the
engine carries (``inputs``) and the image rows of a step (``rows``)."""
