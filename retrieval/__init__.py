"""Neighbour retrieval for ICU: embedders, FAISS indexes (exact, approximate, sharded) and
leak-guarded neighbour selection."""

import logging

# FAISS's loader tries its AVX512 and AVX2 builds first and logs each one this wheel lacks as a
# ModuleNotFoundError at INFO; the dynamic-dispatch build it then loads is the fast one
# (`faiss.get_compile_options()`: OPTIMIZE DD AVX2 AVX512). A successful run should not read as a failure.
logging.getLogger("faiss.loader").setLevel(logging.WARNING)
