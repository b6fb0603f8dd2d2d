"""The paper's published numbers (ISIC2019, SD v1.5), shown beside ours in every table.

Copied from Tables 1-4 of the paper's text (shared/paper/rl4med-ddpo.txt). APR and accuracy in
percent, F1 as a fraction, as printed there.
"""

from __future__ import annotations

# Table 1: images per split; columns MEL, NV, hair, gel_bubbles, ink, ruler
TABLE1: dict[str, tuple[int, int, int, int, int, int]] = {
    "Train": (2750, 9254, 4514, 1300, 201, 1608),
    "Validation": (454, 1665, 802, 228, 34, 308),
    "Test": (537, 1956, 989, 257, 37, 341),
}

# Table 2: (disease, artifact) -> (# real samples, APR % SD, APR % SD+RL)
TABLE2: dict[tuple[str, str], tuple[int, float, float]] = {
    ("MEL", "hair"): (543, 63.74, 86.97),
    ("MEL", "gel_bubbles"): (260, 13.75, 94.37),
    ("MEL", "ink"): (4, 0.2, 1.6),
    ("MEL", "ruler"): (440, 76.56, 93.85),
    ("NV", "hair"): (3051, 44.37, 75.72),
    ("NV", "gel_bubbles"): (489, 13.54, 80.62),
    ("NV", "ink"): (21, 0.1, 1.4),
    ("NV", "ruler"): (520, 80.0, 87.18),
}

# Table 3: model -> (APR %, FID, LPIPS), mean over the 32 prompts
TABLE3: dict[str, tuple[float, float, float]] = {
    "SD": (18.28, 121.47, 0.60),
    "SD+RL": (63.14, 114.7, 0.59),
}

# Table 4: artifact -> training set -> (F1, accuracy %) on the ISIC test split
TABLE4: dict[str, dict[str, tuple[float, float]]] = {
    "hair": {"Real": (0.91, 93.10), "Real+SD-RL": (0.92, 93.54), "Real+SD": (0.91, 93.26)},
    "gel_bubbles": {"Real": (0.66, 93.90), "Real+SD-RL": (0.70, 94.06), "Real+SD": (0.67, 93.90)},
    "ruler": {"Real": (0.89, 96.95), "Real+SD-RL": (0.89, 97.03), "Real+SD": (0.85, 96.23)},
    "ink": {"Real": (0.90, 99.72), "Real+SD-RL": (0.89, 99.68), "Real+SD": (0.86, 99.60)},
}
