"""Evaluation (paper 3): paired samples of SD and SD+RL, APR, FID/FD, LPIPS, augmentation."""

# the file listing a generate job's samples (file, prompt, sample, seed); light to import, so
# the data-only rules (augmentation manifests) need no torch
SAMPLE_INDEX = "index.csv"

# the two models evaluated, by their folder names, and how tables and figures call them
MODELS = {"sd": "SD", "sd_rl": "SD+RL"}

# the real images FD/FID and LPIPS compare samples with: the test split (resized to the model's
# size without cropping), as the authors' metric code
REAL_SPLIT = "test"
