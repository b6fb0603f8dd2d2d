"""Models of the paper: Stable Diffusion (tiny or SD v1.5 from a local folder) and classifiers."""
