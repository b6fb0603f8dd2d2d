"""The tiny SD that stands in for SD v1.5 on a CPU: its autoencoder and its pretraining."""
