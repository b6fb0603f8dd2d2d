"""Evaluation (paper 3): paired samples of SD and SD+RL, APR, FID/FD, LPIPS, augmentation."""

# the file listing a generate job's samples (file, prompt, sample, seed); light to import, so
# the data-only rules (augmentation manifests) need no torch
SAMPLE_INDEX = "index.csv"
