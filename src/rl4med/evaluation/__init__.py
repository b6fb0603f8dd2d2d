"""Evaluation (paper 3): paired samples of SD and SD+RL, APR, FID/FD, LPIPS, augmentation."""
