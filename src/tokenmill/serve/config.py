"""Settings of one `tokenmill serve` process (a leaf module: no torch, no web framework)."""

from __future__ import annotations

from dataclasses import dataclass

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ServeSettings:
    """Limits and access rules; each CLI flag of `tokenmill serve` sets one field."""

    model_name: str  # the id clients send as `model` and /v1/models lists
    api_key: str | None = None  # when set, every endpoint but /health and the playground page needs it as Bearer
    max_batch: int = 8  # sequences generated together in one batch (choices of all running requests)
    max_queue: int = 64  # requests waiting for a batch slot; one more is answered 429
    max_tokens_limit: int = 1024  # the largest max_tokens a request may ask for
    max_n: int = 8  # the most choices per prompt (`n`)
    max_prompts: int = 32  # the most prompts in one /v1/completions request
    max_body_bytes: int = 1 << 20  # request bodies above this are answered 413
    retry_after_s: int = 1  # the Retry-After a 429 answer suggests
    shutdown_timeout_s: float = 10.0  # on SIGTERM/SIGINT, in-flight requests get this long before they are cancelled

    def validate(self) -> None:
        from tokenmill.errors import UserError

        for name in ("max_batch", "max_queue", "max_tokens_limit", "max_n", "max_prompts", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.model_name.strip():
            raise UserError("the model name is empty: pass --model-name NAME")
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("the API key is empty: pass a non-empty --api-key or unset TOKENMILL_API_KEY")
