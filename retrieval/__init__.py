"""Neighbour retrieval for ICU: embedders, FAISS indexes (exact, approximate, sharded) and
leak-guarded neighbour selection."""
