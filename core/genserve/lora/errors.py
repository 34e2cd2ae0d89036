"""The one error type of LoRA loading: its message names the adapter and the reason."""

from __future__ import annotations


class LoRAError(ValueError):
    """An adapter cannot be served; raised at startup, never mid-request."""

    def __init__(self, adapter_id: str, reason: str):
        super().__init__(f"LoRA adapter {adapter_id!r}: {reason}")
        self.adapter_id, self.reason = adapter_id, reason
