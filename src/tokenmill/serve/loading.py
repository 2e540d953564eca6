"""The model a server serves: weights, tokenizer and chat template of one checkpoint, behind the generation engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.errors import UserError
from tokenmill.serve.chat import ChatTemplate, find_chat_template
from tokenmill.serve.schema import APIError, Limits

if TYPE_CHECKING:
    from tokenmill.data.tokenizer import Tokenizer
    from tokenmill.serve.config import ServeSettings


@dataclass
class ServedModel:
    """A loaded checkpoint ready to generate, and what clients may ask of it."""

    generator: Any  # tokenmill.generation.engine.Generator
    tokenizer: Tokenizer
    checkpoint: Path
    context_tokens: int  # the model's max_seq_len
    vocab_size: int
    chat_template: ChatTemplate | None
    created: int  # the checkpoint's modification time, shown as the model's `created`

    def limits(self, settings: ServeSettings) -> Limits:
        return Limits(self.context_tokens, settings.max_tokens_limit, settings.max_n, settings.max_prompts)

    def sampling_params(self, request: Any, max_tokens: int, stops: tuple[str, ...], logprobs: bool) -> Any:
        """The engine's SamplingParams for a validated request."""
        from tokenmill.generation.engine import SamplingParams

        try:
            return SamplingParams(
                max_new_tokens=max_tokens,
                temperature=request.temperature,
                top_k=request.top_k,
                top_p=request.top_p,
                min_p=request.min_p,
                repetition_penalty=request.repetition_penalty,
                stop=stops,
                seed=request.seed,
                n=request.n,
                logprobs=logprobs,
                heal_prompt=getattr(request, "token_healing", False),  # a /v1/completions extension
            )
        except UserError as err:  # the schema checks the same ranges; this keeps any drift a 400, not a 500
            raise APIError(400, str(err)) from None

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def model_card(self, settings: ServeSettings) -> dict[str, Any]:
        """The /v1/models entry; the extra fields tell clients what this model is and is not."""
        return {
            "id": settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tokenmill",
            "context_length": self.context_tokens,
            "max_tokens_limit": settings.max_tokens_limit,
            "chat": self.chat_template is not None,
            "description": (
                "chat model (template from " + Path(self.chat_template.origin).name + ")"
                if self.chat_template
                else "base model: not chat-tuned, /v1/completions only"
            ),
        }


def load_served_model(path: str | Path, device: str | None = None, max_batch: int = 8) -> ServedModel:
    """The checkpoint named by `path` (a run folder or a checkpoint folder), loaded for serving."""
    import torch

    from tokenmill.api import find_checkpoint, load_model, load_tokenizer
    from tokenmill.generation.engine import Generator

    folder = find_checkpoint(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(folder, device=device)
    tokenizer = load_tokenizer(folder)
    generator = Generator(model, tokenizer, device=device, max_batch_size=max_batch, exclusive=True)
    return ServedModel(
        generator,
        tokenizer,
        folder,
        model.cfg.max_seq_len,
        model.cfg.vocab_size,
        find_chat_template(folder, tokenizer),
        int(folder.stat().st_mtime),
    )
