"""Stage i (paper 2.1): the SD UNet fine-tuned on the training images with template prompts."""
